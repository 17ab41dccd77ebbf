"""What area.sector_class means, missing tiles failing by default, and the calibration cache
checked whenever c10.toml names one: resolved where c10.toml is parsed or the plan loads, so the
build, its keys and the Manifest all see the effective values."""
from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import build, plan_of

from c10.config import SECTOR_DEFAULTS, parse_config
from c10.errors import CalibrationCacheError, EngineBuildError
from c10.tools.project import CONFIG_TOML, DEFAULTS

AREA = {"bbox": [50.43, 30.49, 50.47, 30.56], "zooms": [15]}


def config(area: dict | None = None, signing: dict | None = None):
    return parse_config({"area": AREA | (area or {}), "signing": signing or {}}, Path("/c"))


def test_sector_class_sets_validity_and_completeness_unless_c10_toml_does():
    rear, front = config(), config({"sector_class": "active_conflict"})
    assert (rear.signing.validity_days, rear.area.require_complete) == (30, True)
    assert (front.signing.validity_days, front.area.require_complete) == (7, True)
    assert SECTOR_DEFAULTS["active_conflict"]["validity_days"] == 7
    # what c10.toml sets wins, in either sector
    mine = config({"sector_class": "active_conflict", "require_complete": False},
                  {"validity_days": 30})
    assert (mine.signing.validity_days, mine.area.require_complete) == (30, False)
    # the effective values are the request the build keys on (and the Manifest signs)
    assert front.request()["signing"]["validity_days"] == 7
    assert front.signed_request()["signing"]["validity_days"] == 7
    assert front.request() != rear.request()


def test_the_template_leaves_validity_to_the_sector_and_requires_complete_areas():
    data = __import__("tomllib").loads(CONFIG_TOML.format(**DEFAULTS))
    assert "validity_days" not in data["signing"] and data["area"]["require_complete"] is True
    data["area"]["sector_class"] = "active_conflict"
    assert parse_config(data, Path("/c")).signing.validity_days == 7


def test_an_active_conflict_cache_expires_in_seven_days(cache, capsys):
    text = (cache / "c10.toml").read_text().replace('sector_class = "stable_rear"',
                                                    'sector_class = "active_conflict"')
    (cache / "c10.toml").write_text(text)
    code, out = build(cache, capsys)
    assert code == 0, out
    body = json.loads((cache / "Manifest.json").read_bytes())
    issued, expires = (dt.datetime.fromisoformat(body[k].replace("Z", "+00:00"))
                       for k in ("issued_at", "expires"))
    assert expires - issued == dt.timedelta(days=7)


def test_missing_tiles_fail_unless_c10_toml_opts_out(cache, capsys, tmp_path):
    text = re.sub(r"(?m)^require_complete = \w+\n", "", (cache / "c10.toml").read_text())
    (cache / "c10.toml").write_text(text)  # the default
    shutil.move(sorted((cache / "tiles/15").rglob("*.jpg"))[3], tmp_path / "gone.jpg")
    code, out = build(cache, capsys)
    assert code != 0 and "MissingTilesError" in out and "require_complete" in out
    assert not (cache / "Manifest.json").exists()
    (cache / "c10.toml").write_text(text.replace("[area]\n", "[area]\nrequire_complete = false\n"))
    code, out = build(cache, capsys)
    assert code == 0 and "1 missing" in out, out


def with_calibration(cache: Path, value: str, precision: str = "fp32") -> None:
    text = (cache / "c10.toml").read_text().replace(
        'precision = "fp32"', f'precision = "{precision}"\ncalibration = "{value}"', 1)
    (cache / "c10.toml").write_text(text)


@pytest.mark.parametrize("make, why", [
    (lambda d: d / "absent.cache", "does not exist"),
    (lambda d: (d / "empty.cache").write_bytes(b"  \n") and d / "empty.cache", "empty"),
    (lambda d: (d / "dir.cache").mkdir() or d / "dir.cache", "not a regular file"),
])
def test_a_calibration_path_is_checked_whenever_given(cache, tmp_path, make, why):
    path = make(tmp_path)
    with_calibration(cache, str(path))  # an fp32 model: still checked
    with pytest.raises(CalibrationCacheError, match=why) as info:
        plan_of(cache)
    assert "models.global.calibration" in str(info.value)


def test_an_unreadable_calibration_cache_names_the_key(cache, tmp_path, monkeypatch):
    path = tmp_path / "c.cache"
    path.write_bytes(b"TRT-100300-EntropyCalibration2\nimage: 3c010a14\n")
    with_calibration(cache, str(path))
    assert plan_of(cache).plans["global"].spec.calibration_path == path  # readable: fine
    real = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CalibrationCacheError, match="Permission denied.*models.global.calibration"
                       "|models.global.calibration.*Permission denied"):
        plan_of(cache)


def test_int8_on_onnxruntime_refuses_a_tensorrt_calibration_cache(cache, tmp_path):
    path = tmp_path / "c.cache"
    path.write_bytes(b"TRT-100300-EntropyCalibration2\nimage: 3c010a14\n")
    with_calibration(cache, str(path), precision="int8")
    with pytest.raises(CalibrationCacheError, match="not a NumPy .npy.*models.global.calibration"):
        plan_of(cache)


def test_int8_on_a_backend_without_int8_is_refused_when_the_graph_loads(cache, monkeypatch):
    from c10.features.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(OnnxRuntimeBackend, "precisions", ("fp32",))  # as OpenVINO's today
    text = (cache / "c10.toml").read_text().replace('precision = "fp32"', 'precision = "int8"', 1)
    (cache / "c10.toml").write_text(text)
    with pytest.raises(EngineBuildError, match="only the TensorRT and ONNX Runtime backends"):
        plan_of(cache)


def test_int8_without_a_calibration_cache_is_refused_when_the_graph_loads(cache, monkeypatch):
    from c10.features.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(OnnxRuntimeBackend, "quantizer", lambda self: None)  # as TensorRT's
    text = (cache / "c10.toml").read_text().replace('precision = "fp32"', 'precision = "int8"', 1)
    (cache / "c10.toml").write_text(text)
    with pytest.raises(CalibrationCacheError, match="models.global.calibration"):
        plan_of(cache)
