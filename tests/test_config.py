"""c10.toml validation: every bad key named with what is allowed."""
import pytest

from c10.config import load_config, parse_config
from c10.errors import ConfigError
from c10.tools.project import DODO_PY, init_cache

GOOD = {"area": {"bbox": [50.4, 30.4, 50.5, 30.6], "zooms": [15]},
        "models": {"global": {"path": "models/global.onnx"}}}


def _with(**tables):
    data = {k: dict(v) for k, v in GOOD.items()}
    for name, value in tables.items():
        data[name] = value
    return data


def test_good_config_parses(tmp_path):
    cfg = parse_config(GOOD, tmp_path)
    assert cfg.area.zooms == (15,)
    assert cfg.models["global"].path == tmp_path / "models/global.onnx"
    assert cfg.request()["area"]["bbox"] == [50.4, 30.4, 50.5, 30.6]


@pytest.mark.parametrize("data, needle", [
    (_with(aera={}), "unknown key `aera`"),
    (_with(index={"factroy": "Flat"}), "unknown key `index.factroy`"),
    (_with(area={"bbox": [50.5, 30.4, 50.4, 30.6], "zooms": [15]}), "latitudes"),
    (_with(area={"bbox": [50.4, 30.4, 95, 30.6], "zooms": [15]}), "latitudes"),
    (_with(area={"bbox": [50.4, 190, 50.5, 200], "zooms": [15]}), "longitudes"),
    (_with(area={"bbox": [50.4, 30.4, 50.5], "zooms": [15]}), "area.bbox"),
    (_with(area={"bbox": [50.4, 30.4, 50.5, 30.6], "zooms": [25]}), "area.zooms"),
    (_with(area={"bbox": [50.4, 30.4, 50.5, 30.6], "zooms": []}), "area.zooms"),
    (_with(engines={"backend": "cuda"}), "engines.backend"),
    (_with(models={"global": {"path": "m.onnx", "precison": "fp16"}}), "models.global.precison"),
    (_with(models={"global": {"path": "m.onnx", "precision": "fp8"}}), "models.global.precision"),
    (_with(models={"global": {"role": "global"}}), "models.global.path"),
    (_with(shards={"block": 0}), "shards.block"),
    (_with(signing={"validity_days": -1}), "signing.validity_days"),
])
def test_bad_config_names_the_key(tmp_path, data, needle):
    with pytest.raises(ConfigError, match="c10.toml") as err:
        parse_config(data, tmp_path, "c10.toml")
    assert needle in str(err.value)


def test_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="c10 init"):
        load_config(tmp_path)
    (tmp_path / "c10.toml").write_text("[area\nbbox = 1")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(tmp_path)


def test_init_writes_a_config_that_parses_and_never_overwrites(tmp_path):
    (tmp_path / "dodo.py").write_text("# mine\n")
    skipped = init_cache(tmp_path)
    assert skipped == ["dodo.py"]
    assert (tmp_path / "dodo.py").read_text() == "# mine\n"
    cfg = load_config(tmp_path)
    assert set(cfg.models) == {"global", "local", "matcher"}
    assert init_cache(tmp_path) == ["dodo.py", "doit.cfg", "c10.toml"]


def test_repo_dodo_is_what_init_writes():
    from pathlib import Path
    assert (Path(__file__).parent.parent / "dodo.py").read_text() == DODO_PY


def test_int8_settings_enter_only_an_int8_models_request(tmp_path):
    """A model's request (the build identity, the Manifest) holds the INT8 calibration and gate
    settings only when it is INT8: an fp32 cache keeps the request, and the signature, it had
    before they existed; for an INT8 model a changed threshold is a changed request."""
    from c10.config import INT8_KEYS

    fp32 = parse_config(GOOD, tmp_path).request()["models"]["global"]
    assert not set(INT8_KEYS) & set(fp32)
    int8 = {"global": {"path": "models/global.onnx", "precision": "int8"}}
    strict = {"global": {**int8["global"], "int8_min_cosine": 0.995}}
    loose, tight = (parse_config(_with(models=m), tmp_path).request()["models"]["global"]
                    for m in (int8, strict))
    assert set(INT8_KEYS) <= set(loose) and loose["int8_min_cosine"] == 0.99
    assert tight["int8_min_cosine"] == 0.995
    with pytest.raises(ConfigError, match="models.global.int8_min_cosine"):
        parse_config(_with(models={"global": {**int8["global"], "int8_min_cosine": 2}}), tmp_path)
