"""The seed's CacheProvisioner through the Python API: CP-TC-1..11 and CP-INV-1/5, real doit
runs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import BBOX, api_request, snapshot

import c10
from c10.api import (
    Bbox,
    BuildOutcome,
    CacheProvisioner,
    DoitCacheProvisioner,
    EngineCompileRequest,
    SectorClassification,
    set_table_keys,
)
from c10.errors import (
    BuildLockHeldError,
    CacheRootMissingError,
    ConfigError,
    DescriptorBatchError,
    EngineBuildError,
    ManifestCoverageError,
    ManifestWriteError,
)
from c10.report import read_report
from c10.store.lock import BuildLock


@pytest.fixture
def impl() -> DoitCacheProvisioner:
    return DoitCacheProvisioner()






def manifest(cache: Path) -> tuple[bytes, int]:
    return (cache / "Manifest.json").read_bytes(), os.stat(cache / "Manifest.json").st_mtime_ns


def test_conformance(impl):  # CP-TC-10
    assert isinstance(impl, CacheProvisioner)
    assert isinstance(c10.DoitCacheProvisioner(), c10.CacheProvisioner)
    assert not isinstance(object(), CacheProvisioner)


def test_cold_build_succeeds_and_reports(impl, cache, operator_key, capsys):  # CP-TC-1
    report = impl.build_cache_artifacts(api_request(cache, operator_key))
    tiles = len(list((cache / "tiles").rglob("*.jpg")))
    assert report.outcome is BuildOutcome.SUCCESS and report.failure_reason is None
    assert report.engines_built == 1 and report.engines_reused == 0
    assert report.descriptors_generated == tiles and report.shards_generated > 1
    assert report.manifest_path == cache / "Manifest.json"
    assert (report.manifest_hash
            == hashlib.sha256((cache / "Manifest.json").read_bytes()).hexdigest())
    assert report.tiles_present == report.tiles_expected == tiles and report.tiles_missing == 0
    assert len(report.rebuilt_tiles) in (0, tiles)  # 0 until build_shard names its new tiles
    assert read_report(cache).outcome is BuildOutcome.SUCCESS
    assert "c10 build report: SUCCESS" in capsys.readouterr().out


def test_warm_identical_request_is_a_no_op(impl, cache, operator_key):  # CP-TC-2, CP-INV-1
    impl.build_cache_artifacts(api_request(cache, operator_key))
    before, toml = manifest(cache), os.stat(cache / "c10.toml").st_mtime_ns
    report = impl.build_cache_artifacts(api_request(cache, operator_key))
    assert report.outcome is BuildOutcome.IDEMPOTENT_NO_OP
    assert (report.engines_built, report.engines_reused, report.descriptors_generated,
            report.shards_generated) == (0, 0, 0, 0)
    assert manifest(cache) == before and os.stat(cache / "c10.toml").st_mtime_ns == toml
    assert report.manifest_hash == hashlib.sha256(before[0]).hexdigest()


def test_different_bbox_is_written_and_rebuilds(impl, cache, operator_key):  # CP-TC-3
    impl.build_cache_artifacts(api_request(cache, operator_key))
    first = manifest(cache)[0]
    smaller = Bbox(BBOX[0], BBOX[1], BBOX[2], 30.52)  # the tiles outside it stay in tiles/
    report = impl.build_cache_artifacts(api_request(cache, operator_key, bbox=smaller))
    assert report.outcome is BuildOutcome.SUCCESS and report.stages["index"]["ran"] == 1
    assert report.tiles_out_of_scope > 0 and report.tiles_missing == 0
    assert manifest(cache)[0] != first and report.manifest_version == 2
    text = (cache / "c10.toml").read_text()
    assert "bbox = [50.43, 30.49, 50.47, 30.52]" in text and "# Sector to cover" in text


def test_no_tiles_is_a_failure_that_says_fetch_first(impl, cache, operator_key):  # CP-TC-4
    shutil.rmtree(cache / "tiles")
    report = impl.build_cache_artifacts(api_request(cache, operator_key))
    assert report.outcome is BuildOutcome.FAILURE
    assert "no tiles in scope" in report.failure_reason and "fetch tiles" in report.failure_reason
    assert report.tiles_present == 0 and report.tiles_missing == report.tiles_expected > 0
    assert not (cache / "Manifest.json").exists()
    assert read_report(cache).outcome is BuildOutcome.FAILURE


def test_incomplete_area_fails_only_when_required(impl, cache, operator_key, tmp_path):
    gone = sorted((cache / "tiles/15").rglob("*.jpg"))[3]
    shutil.move(gone, tmp_path / "gone.jpg")
    report = impl.build_cache_artifacts(api_request(cache, operator_key))
    assert report.outcome is BuildOutcome.SUCCESS and report.tiles_missing == 1
    first = manifest(cache)
    text = (cache / "c10.toml").read_text().replace("require_complete = false",
                                                    "require_complete = true")
    (cache / "c10.toml").write_text(text)
    report = impl.build_cache_artifacts(api_request(cache, operator_key))
    assert report.outcome is BuildOutcome.FAILURE and report.error_type == "MissingTilesError"
    assert "1 of" in report.failure_reason and "c10 map" in report.failure_reason
    assert manifest(cache) == first  # never signed over an incomplete area


def test_concurrent_build_raises_and_writes_nothing(impl, cache, operator_key):  # CP-TC-5, CP-INV-4
    impl.build_cache_artifacts(api_request(cache, operator_key))
    holder = BuildLock(cache)
    holder.acquire()
    try:
        before = snapshot(cache)
        with pytest.raises(BuildLockHeldError, match=f"pid {os.getpid()}"):
            impl.build_cache_artifacts(api_request(cache, operator_key,
                                               sector_class=SectorClassification.ACTIVE_CONFLICT))
        assert snapshot(cache) == before  # not even the request went into c10.toml
    finally:
        holder.release()


def test_orphan_raises_and_keeps_previous_manifest(impl, cache, operator_key):  # CP-TC-6
    impl.build_cache_artifacts(api_request(cache, operator_key))
    before = manifest(cache)
    (cache / "index" / "smuggled.bin").write_bytes(b"x")
    (cache / "models" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ManifestCoverageError, match="models/extra.onnx"):
        impl.build_cache_artifacts(api_request(cache, operator_key,
                                           sector_class=SectorClassification.ACTIVE_CONFLICT))
    assert manifest(cache) == before
    assert read_report(cache).error_type == "ManifestCoverageError"


def test_key_outside_allowlist_raises_with_zero_writes(impl, cache, operator_key,
                                                       tmp_path):  # CP-TC-7
    from c10.trust.keys import generate_key

    impl.build_cache_artifacts(api_request(cache, operator_key))
    other = tmp_path / "keys" / "intruder.pem"
    other.parent.mkdir()
    generate_key(other)
    before = snapshot(cache)
    with pytest.raises(ManifestWriteError, match="allowed_keyids"):
        impl.build_cache_artifacts(api_request(cache, operator_key, key_path=other))
    assert snapshot(cache) == before


def test_engine_build_error_propagates_and_manifest_stays(impl, cache, operator_key):  # CP-TC-8
    impl.build_cache_artifacts(api_request(cache, operator_key))
    before = manifest(cache)
    shutil.copy(cache / "models/global.onnx", cache / "models/second.onnx")
    text = (cache / "c10.toml").read_text().replace(
        "[shards]", '[models.second]\npath = "models/second.onnx"\nrole = "local"\n'
                    'input_size = [64, 64]\nprecision = "fp16"\n\n[shards]')
    (cache / "c10.toml").write_text(text)
    with pytest.raises(EngineBuildError, match="fp16"):
        impl.build_cache_artifacts(api_request(cache, operator_key))
    engines = sorted(p.name for p in (cache / "engines").iterdir())
    # engine + sidecar, no temp
    assert len(engines) == 2 and all(n.startswith("global-") for n in engines)
    assert manifest(cache) == before
    assert read_report(cache).error_type == "EngineBuildError"


def test_descriptor_error_propagates_and_manifest_stays(impl, cache, operator_key):  # CP-TC-9
    impl.build_cache_artifacts(api_request(cache, operator_key))
    before = manifest(cache)
    bad = sorted((cache / "tiles/15").rglob("*.jpg"))[2]
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DescriptorBatchError, match=bad.relative_to(cache).as_posix()):
        impl.build_cache_artifacts(api_request(cache, operator_key))
    assert manifest(cache) == before and any((cache / "engines").iterdir())


def test_compile_engines_only(impl, cache, operator_key):  # CP-TC-11
    entries = impl.compile_engines_for_corpus(EngineCompileRequest(cache_root=cache))
    assert isinstance(entries, tuple) and len(entries) == 1
    entry = entries[0]
    assert (entry.model, entry.backend, entry.built) == ("global", "onnxruntime", True)
    assert entry.path.is_file() and entry.key in entry.path.name
    assert not (cache / "shards").exists() and not (cache / "Manifest.json").exists()
    assert not (cache / ".c10.lock").exists()  # no build lock taken
    again = impl.compile_engines_for_corpus(EngineCompileRequest(cache_root=cache,
                                                                 models=("global",),
                                                                 backend="onnxruntime"))
    assert again[0].built is False and again[0].path == entry.path
    report = impl.build_cache_artifacts(api_request(cache, operator_key))
    # D-C10-6: reused, not recompiled
    assert (report.engines_built, report.engines_reused) == (0, 1)


def test_compile_refuses_what_the_build_would_not_declare(impl, cache):
    with pytest.raises(ConfigError, match="engines.backend"):
        impl.compile_engines_for_corpus(EngineCompileRequest(cache_root=cache, backend="openvino"))
    with pytest.raises(ConfigError, match="no model"):
        impl.compile_engines_for_corpus(EngineCompileRequest(cache_root=cache, models=("nope",)))
    assert not (cache / "engines").exists()


def test_missing_cache_root_is_never_created(impl, tmp_path, operator_key):  # CP-INV-5
    root = tmp_path / "nowhere"
    with pytest.raises(CacheRootMissingError):
        impl.build_cache_artifacts(api_request(root, operator_key))
    with pytest.raises(CacheRootMissingError):
        impl.compile_engines_for_corpus(EngineCompileRequest(cache_root=root))
    assert not root.exists()


def test_request_is_written_into_c10_toml(impl, cache, operator_key):
    req = api_request(cache, operator_key, sector_class=SectorClassification.ACTIVE_CONFLICT,
                  zoom_levels=(15,))
    impl.build_cache_artifacts(req)
    text = (cache / "c10.toml").read_text()
    assert 'sector_class = "active_conflict"' in text and f'key = "{operator_key[0]}"' in text
    body = json.loads((cache / "Manifest.json").read_bytes())
    assert body["request"]["area"]["sector_class"] == "active_conflict"
    assert impl.build_cache_artifacts(req).outcome is BuildOutcome.IDEMPOTENT_NO_OP


def test_bad_request_is_refused_before_any_write(impl, cache, operator_key):
    before = snapshot(cache)
    with pytest.raises(ConfigError, match="area.bbox"):
        impl.build_cache_artifacts(api_request(cache, operator_key,
                                           bbox=Bbox(50.5, 30.49, 50.4, 30.56)))
    with pytest.raises(ConfigError, match="zoom_levels"):
        impl.build_cache_artifacts(api_request(cache, operator_key, zoom_levels=()))
    assert snapshot(cache) == before


def test_set_table_keys_keeps_comments_and_adds_missing_keys():
    text = ("# head\n[area]\n# the box\nbbox = [1, 2, 3, 4]  # old\nzooms = [15]\n\n"
            "[signing]\nvalidity_days = 3\n")
    out = set_table_keys(text, "area", {"bbox": "[5.0, 6.0, 7.0, 8.0]",
                                        "sector_class": '"stable_rear"'})
    out = set_table_keys(out, "signing", {"key": '"/k.pem"'})
    out = set_table_keys(out, "engines", {"backend": '"auto"'})
    assert re.search(r"# the box\nbbox = \[5.0, 6.0, 7.0, 8.0\]\nzooms = \[15\]\nsector_class", out)
    assert ('validity_days = 3\nkey = "/k.pem"' in out
            and out.endswith('[engines]\nbackend = "auto"\n'))
