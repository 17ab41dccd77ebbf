"""`c10 export-models` writes its [models.*] tables into c10.toml: comments and other tables kept,
a table edited by hand refused (with its diff) unless --force. The export itself (torch) is
stubbed; the c10.toml writing is real."""
from __future__ import annotations

import tomllib

import pytest

from c10.cli import main as c10_main
from c10.config import load_config
from c10.errors import BuildLockHeldError, ConfigError
from c10.store.lock import BuildLock
from c10.tools import export
from c10.tools.export import models_toml
from c10.tools.export.tables import plan_models_tables, write_models_tables
from c10.tools.project import init_cache

K = 64


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    init_cache(root)
    text = (root / "c10.toml").read_text()
    (root / "c10.toml").write_text("# my notes on this sector\n" + text
                                   + "\n# the end: my own comment\n")
    return root


@pytest.fixture
def exported(monkeypatch):
    """The export stubbed: records its calls, writes no ONNX (needs no torch)."""
    calls = []
    monkeypatch.setattr(export, "export_models", lambda root, **options: calls.append(options))
    return calls


def outside_models(text: str) -> str:
    """c10.toml without its [models.*] tables (and the blank lines around them)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("["):
            inside = line.startswith("[models.")
        if not inside:
            out.append(line)
    return "\n".join(out).replace("\n\n\n", "\n\n")


def models(root):
    return tomllib.loads((root / "c10.toml").read_text())["models"]


def test_export_writes_its_tables_and_keeps_every_comment_and_other_table(cache, exported,
                                                                         capsys):
    before = (cache / "c10.toml").read_text()
    assert c10_main(["export-models", str(cache), "--keypoints", str(K)]) == 0
    assert exported and exported[0]["keypoints"] == K
    text = (cache / "c10.toml").read_text()
    assert models(cache) == tomllib.loads(models_toml(K))["models"]
    for kept in ("# my notes on this sector", "# the end: my own comment", "[signing]",
                 "# Where shards are embedded", '[index]\n# Any faiss.index_factory string',
                 f"# {K} keypoints per tile"):
        assert kept in text
    assert outside_models(text) == outside_models(before)  # byte for byte
    assert "replaced" in capsys.readouterr().out
    config = load_config(cache)  # a valid request, pointing at the exported files
    assert config.models["global"].input_size == (256, 256) and config.models["matcher"]

    # again: nothing to change, nothing written
    mtime = (cache / "c10.toml").stat().st_mtime_ns
    assert c10_main(["export-models", str(cache), "--keypoints", str(K)]) == 0
    assert (cache / "c10.toml").stat().st_mtime_ns == mtime
    assert "already as exported" in capsys.readouterr().out


def test_a_hand_edited_table_is_refused_with_its_diff_unless_force(cache, exported, capsys):
    text = (cache / "c10.toml").read_text().replace("batch_size = 32", "batch_size = 8  # mine")
    (cache / "c10.toml").write_text(text)
    assert c10_main(["export-models", str(cache), "--keypoints", str(K)]) == 2
    err = capsys.readouterr().err
    assert exported == []  # refused before minutes of export
    assert "--- c10.toml [models.global]" in err and "+++ export [models.global]" in err
    assert "-batch_size = 8  # mine" in err and "+batch_size = 16" in err
    assert "[models.global]" in err and "--force" in err and "[models.local]" not in err.split(
        "+++")[0]
    assert (cache / "c10.toml").read_text() == text  # untouched, the other tables too

    assert c10_main(["export-models", str(cache), "--keypoints", str(K), "--force"]) == 0
    out = capsys.readouterr().out
    assert "-batch_size = 8  # mine" in out and "edited by hand; --force" in out
    assert models(cache) == tomllib.loads(models_toml(K))["models"]
    assert exported[0]["force"] is True


def test_t16_removes_the_templates_matcher_but_keeps_a_hand_made_one(cache):
    tables = models_toml(K, matcher=False)
    update = plan_models_tables(cache / "c10.toml", tables, known=[models_toml(K)])
    assert update.removed == ["matcher"] and sorted(update.replaced) == ["global", "local"]
    write_models_tables(update)
    assert set(models(cache)) == {"global", "local"}

    text = (cache / "c10.toml").read_text() + (
        '\n[models.matcher]\npath = "models/my-matcher.onnx"\nrole = "matcher"\n'
        'input_size = []\n')
    (cache / "c10.toml").write_text(text)
    update = plan_models_tables(cache / "c10.toml", tables, known=[models_toml(K)])
    assert update.kept == ["matcher"] and not update.changed and "kept" in update.summary()


def test_a_table_the_cache_lacks_is_added_and_other_models_are_left(cache):
    text = (cache / "c10.toml").read_text()
    start, end = text.index("[models.local]"), text.index("[models.matcher]")
    mine = '[models.mine]\npath = "models/mine.onnx"\nrole = "local"\n\n'
    text = text[:start] + mine + text[end:]
    (cache / "c10.toml").write_text(text)
    update = plan_models_tables(cache / "c10.toml", models_toml(K))
    assert update.added == ["local"] and not update.edited
    write_models_tables(update)
    assert set(models(cache)) == {"global", "local", "matcher", "mine"}
    assert models(cache)["mine"] == {"path": "models/mine.onnx", "role": "local"}


def test_refusals_write_nothing(cache, tmp_path):
    (cache / "c10.toml").write_text((cache / "c10.toml").read_text().replace(
        'role = "matcher"', 'role = "matcher"\nbatch_size = 2'))
    update = plan_models_tables(cache / "c10.toml", models_toml(K))
    assert update.refused() == ["matcher"] and update.edited["matcher"].startswith("---")
    with pytest.raises(ConfigError, match=r"\[models.matcher\].*--force"):
        write_models_tables(update)
    with pytest.raises(ConfigError, match="c10 init"):
        plan_models_tables(tmp_path / "c10.toml", models_toml(K))
    forced = plan_models_tables(cache / "c10.toml", models_toml(K), force=True)
    holder = BuildLock(cache)
    holder.acquire()  # c10.toml is the build's request: never rewritten under a running build
    try:
        with pytest.raises(BuildLockHeldError):
            write_models_tables(forced)
    finally:
        holder.release()
    assert "batch_size = 2" in (cache / "c10.toml").read_text()


def test_without_a_c10_toml_the_tables_are_printed(tmp_path, exported, capsys):
    assert c10_main(["export-models", str(tmp_path), "--keypoints", str(K)]) == 0
    out = capsys.readouterr().out
    assert "c10 init" in out and "[models.global]" in out and exported
    assert not (tmp_path / "c10.toml").exists()
