"""The house's layering, checked on the source: one installed package, imports in one direction,
only the doit layer imports doit, the verifier imports only trust code, no import-time side
effects."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower ranks never import higher ones (a module may import its own rank).
RANKS = [
    ("c10", "c10.errors", "c10.canonical"),
    ("c10.store",),
    ("c10.config", "c10.report", "c10.trust"),
    ("c10.features",),
    ("c10.plan",),
    ("c10.query",),
    ("c10.tools",),
    ("c10.rules",),             # the doit layer
    ("c10.cli", "c10.api"),     # the faces
]
# The package root re-exports the seed API and the aircraft's FlightCache on first use
# (c10.BuildRequest, c10.FlightCache): imports from above, made only when a caller asks for them.
LAZY_FACES = {("c10", "c10.api"), ("c10", "c10.query.flight")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "rules":
        parts.insert(0, "c10")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank(module: str) -> int:
    best = None
    for i, names in enumerate(RANKS):
        for name in names:
            if ((module == name or module.startswith(name + "."))
                    and (best is None or len(name) > best[1])):
                best = (i, len(name))
    assert best is not None, module
    return best[0]


def sources() -> dict[str, Path]:
    files = [*ROOT.glob("c10/**/*.py"), *ROOT.glob("rules/*.py")]
    return {module_name(p): p for p in files}


def imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Absolute module names `path` imports (`from a import b` counts a and a.b); TYPE_CHECKING
    blocks skipped."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(node, top: bool):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if not (module_level_only and inner):
                visit(child, top and not inner)

    visit(tree, True)
    return out


def known(name: str, modules: dict) -> str | None:
    """The c10 module `name` refers to (a module, or a name inside one)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def test_imports_run_one_way():
    modules = sources()
    wrong = []
    for module, path in modules.items():
        for name in imports(path):
            target = known(name, modules) if name.startswith("c10") else None
            if target and rank(target) > rank(module) and (module, target) not in LAZY_FACES:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycle_at_module_level():
    modules = sources()
    graph = {m: {t for n in imports(p, module_level_only=True) if n.startswith("c10")
                 and (t := known(n, modules)) and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    # c10 <-> c10.x: importing a submodule imports its package first; that is not a cycle
    cycles = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".")
                                           for a, b in zip(c, c[1:]))]
    assert cycles == []


def test_only_the_doit_layer_imports_doit():
    offenders = [m for m, p in sources().items() if rank(m) != rank("c10.rules")
                 and any(n == "doit" or n.startswith("doit.") for n in imports(p))]
    assert offenders == []


def test_every_package_in_the_tree_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in [*ROOT.glob("c10/**/__init__.py"),
                                                               *ROOT.glob("rules/__init__.py")]}
    assert listed == found


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_no_top_level_rules_package(tmp_path):
    proc = _python("import rules", tmp_path)
    assert proc.returncode != 0 and "No module named 'rules'" in proc.stderr
    assert _python("import c10.rules.dodo", tmp_path).returncode == 0


def test_the_verifier_imports_only_trust_code(tmp_path):
    code = ("import sys, c10.trust.verify\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('c10', 'doit', 'onnxruntime', 'openvino', 'faiss', 'numpy', 'onnx'))))")
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    allowed = {"c10", "c10.errors", "c10.canonical", "c10.store", "c10.store.atomic",
               "c10.store.digest", "c10.store.layout", "c10.trust", "c10.trust.dsse",
               "c10.trust.files", "c10.trust.freshness", "c10.trust.hashing", "c10.trust.keys",
               "c10.trust.manifest",
               "c10.trust.strictjson", "c10.trust.tilelists", "c10.trust.tree",
               "c10.trust.verify"}
    assert loaded <= allowed, loaded - allowed


@pytest.mark.parametrize("module", sorted(m for m in sources()
                                          if not m.startswith("c10.tools.export.")
                                          and not m.endswith(".__main__")))
def test_importing_a_module_writes_nothing(module, tmp_path):
    """No import-time side effects: a module imported in a cache directory leaves it as it was."""
    (tmp_path / "c10.toml").write_text("[area]\nbbox = [50.0, 30.0, 50.1, 30.1]\nzooms = [15]\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _python(f"import {module}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
