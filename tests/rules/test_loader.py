"""`doit` in a cache loads c10's installed graph through the loader doit.cfg names: nothing
planted in the cache directory (a module, a package, bytecode) is imported, and dodo.py alone says
what to do."""
from __future__ import annotations

import os
import py_compile
import re
import subprocess
import sys
from pathlib import Path

from c10.tools.project import DODO_PY, OLD_DODO_PY, init_cache

DOIT = str(Path(sys.executable).with_name("doit"))


def doit(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    return subprocess.run([DOIT, *args], cwd=cache, env=env | {"C10_NO_PROGRESS": "1"},
                          capture_output=True, text=True, timeout=300)


def plant(cache: Path, rel: str, marker: Path) -> None:
    """A module that, if anything imports it, leaves `marker` behind."""
    path = cache / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"open({str(marker)!r}, 'a').write({rel!r} + '\\n')\n"
                    "def task_evil():\n    return {'actions': ['true']}\n")


def test_strays_named_like_the_graph_change_nothing(cache, tmp_path):
    clean = doit(cache, "list", "--all")
    assert clean.returncode == 0, clean.stderr
    marker = tmp_path / "imported"
    for rel in ("rules/__init__.py", "rules/tasks.py", "rules.py", "c10/__init__.py",
                "c10/rules/__init__.py", "c10/rules/dodo.py", "faiss.py", "onnxruntime.py"):
        plant(cache, rel, marker)
    listed = doit(cache, "list", "--all")
    assert listed.returncode == 0 and listed.stdout == clean.stdout and "evil" not in listed.stdout
    run = doit(cache, "build_cache")
    ran = re.findall(r"^\.  (\S+)", run.stdout, re.M)
    assert ran[0].startswith("engines:") and "coverage" in ran and "manifest" not in ran, run.stdout
    assert ("ManifestCoverageError" in run.stdout and "c10/__init__.py" in run.stdout
            and "8 file(s)" in run.stdout)
    # the index, engines, shards ran: no stray was imported
    assert not marker.exists(), marker.read_text()


def _planted_pyc(cache: Path, marker: Path) -> Path:
    """Bytecode for dodo.py that Python would load without looking at the source (unchecked
    hash)."""
    evil = cache / "evil_src.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    pyc = cache / "__pycache__" / f"dodo.{sys.implementation.cache_tag}.pyc"
    pyc.parent.mkdir(exist_ok=True)
    py_compile.compile(str(evil), cfile=str(pyc),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    evil.unlink()
    return pyc


def test_planted_bytecode_beside_dodo_never_runs(cache, tmp_path):
    marker = tmp_path / "pyc-ran"
    pyc = _planted_pyc(cache, marker)
    run = doit(cache, "build_cache")
    assert not marker.exists()
    assert run.returncode != 0 and "ManifestCoverageError" in run.stdout
    assert pyc.relative_to(cache).as_posix() in run.stdout  # an orphan like any smuggled file
    # the control: doit's own loader (no doit.cfg) would have run it
    (cache / "doit.cfg").unlink()
    doit(cache, "list")
    assert marker.read_text() == "ran"


def test_dodo_alone_says_to_restore_doit_cfg(cache):
    (cache / "doit.cfg").unlink()
    run = doit(cache, "build_cache")
    assert run.returncode != 0 and "doit.cfg is missing" in run.stdout + run.stderr
    assert "c10 init ." in run.stdout + run.stderr


def test_init_replaces_an_older_c10s_dodo_and_keeps_the_users(tmp_path):
    (tmp_path / "dodo.py").write_text(OLD_DODO_PY[0])
    assert init_cache(tmp_path) == []
    assert (tmp_path / "dodo.py").read_text() == DODO_PY and (tmp_path / "doit.cfg").is_file()
    (tmp_path / "dodo.py").write_text(OLD_DODO_PY[0] + "# mine\n")
    assert "dodo.py" in init_cache(tmp_path)


def test_list_and_info_need_no_dodo(cache):
    (cache / "dodo.py").unlink()
    assert "build_cache" in doit(cache, "list").stdout
    assert ("Write Manifest.json and its signed DSSE envelope"
            in doit(cache, "info", "manifest").stdout)
