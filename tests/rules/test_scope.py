"""A request smaller or other than the tile store (seed CP-TC-3, CP-INV-2): tiles outside the
request are inputs kept in tiles/, never orphans, never indexed nor signed nor packed; a failed
API request leaves c10.toml as it was."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat

import pytest
from conftest import BBOX, ZOOMS, build, built, executed
from listing import listed_files

from c10.api import Bbox, BuildOutcome, BuildRequest, DoitCacheProvisioner, SectorClassification
from c10.cli import main as c10_main
from c10.errors import ManifestCoverageError
from c10.report import read_report
from c10.store.tiles import Scope, scan_tiles

SMALLER = (BBOX[0], BBOX[1], BBOX[2], 30.52)  # the tiles of columns x <= 19160 at zoom 15


def set_area(cache, bbox=None, zooms=None) -> None:
    text = (cache / "c10.toml").read_text()
    if bbox is not None:
        text = re.sub(r"bbox = \[.*?\]", f"bbox = {list(bbox)}", text)
    if zooms is not None:
        text = re.sub(r"zooms = \[.*?\]", f"zooms = {list(zooms)}", text)
    (cache / "c10.toml").write_text(text)


def in_scope(cache, bbox, zooms) -> set[str]:
    scope = Scope(bbox, zooms)
    return {t.path for t in scan_tiles(cache).tiles if t in scope}


def all_tiles(cache) -> set[str]:
    return {t.path for t in scan_tiles(cache).tiles}


def listed(cache, kind: str = "tile") -> set[str]:
    return {f["path"] for f in listed_files(cache) if f["kind"] == kind}


def index_rows(cache) -> int:
    import numpy as np

    body = json.loads((cache / "Manifest.json").read_bytes())
    return len(np.load(cache / body["runtime"]["models"]["global"]["index"]["ids"]))


def run(capsys, *args) -> tuple[int, str]:
    code = c10_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def verify(capsys, root, pub, tmp_path, *extra) -> tuple[int, dict]:
    code, out = run(capsys, "verify", root, "--trusted-keys", pub, "--json", "--state",
                    tmp_path / "verify-state.json", *extra)
    return code, json.loads(out)


def test_smaller_bbox_with_the_wider_tiles_in_place_then_widened_again(cache, capsys,
                                                                       operator_key, tmp_path):
    """CP-TC-3: a warm build with a smaller bbox, the wider area's tiles still in tiles/, is
    SUCCESS with only the smaller area indexed and listed; the others are counted as out of scope
    (BuildReport, `c10 status`), the ground verify accepts them as unshipped inputs, the flight
    image holds none of them. Re-widened, the build succeeds again over every tile."""
    built(cache, capsys)
    everything = all_tiles(cache)
    inner = in_scope(cache, SMALLER, ZOOMS)
    assert 0 < len(inner) < len(everything)
    set_area(cache, bbox=SMALLER)
    code, out = build(cache, capsys)
    assert code == 0, out
    assert "index:global" in executed(out) and "manifest" in executed(out)
    report = read_report(cache)
    assert report.outcome is BuildOutcome.SUCCESS and report.manifest_version == 2
    assert report.tiles_present == len(inner)
    assert report.tiles_out_of_scope == len(everything) - len(inner)
    assert f"{len(everything) - len(inner)} more in tiles/ outside area.bbox/zooms" in out
    assert listed(cache) == inner and index_rows(cache) == len(inner)
    assert all_tiles(cache) == everything  # nothing the user put there was touched

    code, out = run(capsys, "status", cache)
    assert f"tiles out of scope: {len(everything) - len(inner)}" in out
    assert "would FAIL" not in out

    code, result = verify(capsys, cache, operator_key[1], tmp_path)
    assert code == 0 and result["out_of_scope"] == len(everything) - len(inner), result
    image = tmp_path / "usb" / "sector"
    image.parent.mkdir()
    code, out = run(capsys, "pack", cache, image, "--trusted-keys", operator_key[1])
    assert code == 0, out
    assert all_tiles(image) == inner
    code, result = verify(capsys, image, operator_key[1], tmp_path, "--airborne")
    assert code == 0 and result["out_of_scope"] == 0, result
    # the aircraft never accepts one: an out-of-scope tile in a flight image is an extra file
    stray = sorted(everything - inner)[0]
    (image / stray).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(cache / stray, image / stray)
    code, result = verify(capsys, image, operator_key[1], tmp_path, "--airborne")
    assert code != 0 and result["reason"] == "extra-file", result

    set_area(cache, bbox=BBOX)  # re-widened
    code, out = build(cache, capsys)
    assert code == 0, out
    report = read_report(cache)
    assert report.outcome is BuildOutcome.SUCCESS and report.manifest_version == 3
    assert report.tiles_out_of_scope == 0 and listed(cache) == everything
    assert index_rows(cache) == len(everything)
    assert verify(capsys, cache, operator_key[1], tmp_path)[0] == 0


def test_fewer_zooms_then_the_zoom_back(cache, capsys, operator_key, tmp_path):
    """CP-TC-3 with zooms: a build over zooms [14, 15], then over [15] alone with the zoom-14 tiles
    in place (SUCCESS, zoom 15 only listed), then over both again."""
    from c10.tools import synth

    synth.make_tiles(cache / "tiles", BBOX, (14,), size=128, seed=3)
    set_area(cache, zooms=(14, 15))
    built(cache, capsys)
    both = all_tiles(cache)
    z15 = {p for p in both if p.startswith("tiles/15/")}
    assert listed(cache) == both and z15 and len(z15) < len(both)
    set_area(cache, zooms=(15,))
    code, out = build(cache, capsys)
    assert code == 0, out
    report = read_report(cache)
    assert report.outcome is BuildOutcome.SUCCESS
    assert report.tiles_out_of_scope == len(both) - len(z15)
    assert listed(cache) == z15 and index_rows(cache) == len(z15)
    assert not list((cache / "shards/global").glob("14"))  # the zoom-14 shards are gone
    code, result = verify(capsys, cache, operator_key[1], tmp_path)
    assert code == 0 and result["out_of_scope"] == len(both) - len(z15), result
    set_area(cache, zooms=(14, 15))
    code, out = build(cache, capsys)
    assert code == 0, out
    assert read_report(cache).outcome is BuildOutcome.SUCCESS and listed(cache) == both


def test_strays_stay_orphans_with_a_smaller_request(cache, capsys):
    """CP-TC-3, CP-TC-6: only tiles become out of scope; a file in tiles/ not named z/x/y (or
    beyond its zoom's range) still fails the coverage gate, wherever it lies."""
    built(cache, capsys)
    set_area(cache, bbox=SMALLER)
    before = (cache / "Manifest.json").read_bytes()
    column = sorted((cache / "tiles/15").iterdir())[-1]  # a column outside the smaller bbox
    for rel in (column / "notes.txt", column / "0042.jpg", cache / "tiles/15/40000/1.jpg"):
        rel.parent.mkdir(parents=True, exist_ok=True)
        rel.write_bytes(b"x")
    code, out = build(cache, capsys)
    assert code != 0 and "ManifestCoverageError" in out
    assert "notes.txt" in out and "0042.jpg" in out and "tiles/15/40000/1.jpg" in out
    assert (cache / "Manifest.json").read_bytes() == before


def test_ground_verify_accepts_only_real_tiles_outside_the_signed_area(cache, capsys,
                                                                      operator_key, tmp_path):
    """CP-TC-3 from the attacker's side: the ground verify accepts an unlisted file under tiles/
    only as a regular, singly linked, not setuid z/x/y tile outside the signed area, one per
    z/x/y; a tile planted inside the area, a second name of one out-of-scope tile, a symlink or a
    hard link is refused."""
    built(cache, capsys)
    set_area(cache, bbox=SMALLER)
    built(cache, capsys)
    pub = operator_key[1]
    inner = sorted(listed(cache))
    outer = sorted(all_tiles(cache) - set(inner))
    assert verify(capsys, cache, pub, tmp_path)[0] == 0

    def refused(path, reason):
        code, result = verify(capsys, cache, pub, tmp_path)
        assert code != 0 and result["reason"] == reason, result
        os.unlink(path)
        assert verify(capsys, cache, pub, tmp_path)[0] == 0

    column, name = inner[0].rsplit("/", 1)
    planted = cache / column / f"{int(name.split('.')[0]) + 100}.jpg"  # far south of the area
    shutil.copy(cache / inner[0], planted)  # a new tile outside the area: one more input
    assert verify(capsys, cache, pub, tmp_path)[1]["out_of_scope"] == len(outer) + 1
    os.unlink(planted)
    inside = cache / inner[0].replace(".jpg", ".png")  # a second name of a listed, in-scope tile
    shutil.copy(cache / inner[0], inside)
    refused(inside, "extra-file")
    twin = cache / outer[0].replace(".jpg", ".png")  # a second name of an out-of-scope tile
    shutil.copy(cache / outer[0], twin)
    refused(twin, "extra-file")
    link = cache / outer[0].replace(".jpg", ".webp")
    os.symlink(cache / inner[0], link)
    refused(link, "symlink")
    os.unlink(cache / outer[1])
    os.link(cache / inner[1], cache / outer[1])  # a hard link of a listed tile
    code, result = verify(capsys, cache, pub, tmp_path)
    assert code != 0 and result["reason"] in ("extra-file", "hardlink"), result
    os.unlink(cache / outer[1])
    setuid = cache / outer[2]
    os.chmod(setuid, os.stat(setuid).st_mode | stat.S_ISUID)
    code, result = verify(capsys, cache, pub, tmp_path)
    assert code != 0 and result["reason"] == "extra-file", result


# ---------------------------------------------------------------- the Python API

def request(cache, key, bbox=BBOX, zooms=ZOOMS, **changes) -> BuildRequest:
    values = dict(bbox=Bbox(*bbox), zoom_levels=zooms,
                  sector_class=SectorClassification.STABLE_REAR,
                  calibration_path=cache.parent / "no-int8-here.cache", cache_root=cache,
                  key_path=key[0])
    return BuildRequest(**(values | changes))


def test_api_smaller_bbox_then_wider_again(cache, operator_key):
    """CP-TC-3 through the seed's API: the smaller request is SUCCESS, written into c10.toml, with
    only its tiles listed; the wider one again is SUCCESS over every tile."""
    api = DoitCacheProvisioner()
    assert api.build_cache_artifacts(request(cache, operator_key)).outcome is BuildOutcome.SUCCESS
    everything, inner = all_tiles(cache), in_scope(cache, SMALLER, ZOOMS)
    report = api.build_cache_artifacts(request(cache, operator_key, bbox=SMALLER))
    assert report.outcome is BuildOutcome.SUCCESS, report.failure_reason
    assert report.manifest_version == 2 and report.stages["index"]["ran"] == 1
    assert report.tiles_out_of_scope == len(everything) - len(inner)
    assert listed(cache) == inner
    assert f"bbox = {list(SMALLER)}" in (cache / "c10.toml").read_text()
    report = api.build_cache_artifacts(request(cache, operator_key))
    assert report.outcome is BuildOutcome.SUCCESS and listed(cache) == everything


def test_api_request_with_no_tiles_fails_and_leaves_c10_toml_as_it_was(cache, operator_key):
    """CP-TC-4, CP-INV-2: an API request over a bbox with no tiles is FAILURE; c10.toml is byte for
    byte what it was before the call (the request written into it is taken back), and the
    Manifest in force is the previous one."""
    api = DoitCacheProvisioner()
    api.build_cache_artifacts(request(cache, operator_key))
    toml, manifest = (cache / "c10.toml").read_bytes(), (cache / "Manifest.json").read_bytes()
    report = api.build_cache_artifacts(request(cache, operator_key,
                                               bbox=(10.0, 10.0, 10.01, 10.01)))
    assert report.outcome is BuildOutcome.FAILURE and "no tiles in scope" in report.failure_reason
    assert (cache / "c10.toml").read_bytes() == toml
    assert (cache / "Manifest.json").read_bytes() == manifest
    # the request in force is still the old one: the next identical call is a no-op
    again = api.build_cache_artifacts(request(cache, operator_key))
    assert again.outcome is BuildOutcome.IDEMPOTENT_NO_OP


def test_api_request_that_raises_leaves_c10_toml_as_it_was(cache, operator_key):
    """CP-INV-2: a request whose build raises (an orphan: ManifestCoverageError) also leaves
    c10.toml byte for byte as it was, mode included."""
    api = DoitCacheProvisioner()
    api.build_cache_artifacts(request(cache, operator_key))
    os.chmod(cache / "c10.toml", 0o600)
    toml = (cache / "c10.toml").read_bytes()
    (cache / "models" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestCoverageError, match="models/extra.bin"):
        api.build_cache_artifacts(request(cache, operator_key, bbox=SMALLER,
                                          sector_class=SectorClassification.ACTIVE_CONFLICT))
    assert (cache / "c10.toml").read_bytes() == toml
    assert stat.S_IMODE(os.stat(cache / "c10.toml").st_mode) == 0o600
