"""Every next step a message names exists: c10.toml keys against the config dataclasses, `c10 ...`
commands and flags against the argparse tree, `doit ...` against doit's commands and c10's tasks."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

from c10 import config
from c10.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"engines": config.Engines, "shards": config.Shards, "index": config.Index,
            "signing": config.Signing, "executor": config.Executor}
AREA = {f.name for f in dataclasses.fields(config.Area)}
MODEL = {f.name for f in dataclasses.fields(config.Model)} - {"name"}
KEY = re.compile(r"(?<![\w/.{-])(area|engines|models|shards|index|signing|executor)\."
                 r"(\{[^}]*\}|[a-z_]+)"
                 r"(?:\.([a-z_]+))?(?![\w/(])")
C10 = re.compile(r"`c10 ((?:--)?[a-z][a-z-]*)([^`]*)`")
DOIT = re.compile(r"`doit (-[a-zA-Z] \S+|[a-z_-]+)(?::\S*)?([^`]*)`")
DOIT_COMMANDS = {"list", "info", "clean", "forget", "ignore", "dumpdb", "strace", "reset-dep",
                 "run", "help", "auto"}
TASKS = {"build_cache", "engines", "shards", "index", "coverage", "manifest", "prune"}


def messages() -> list[tuple[str, str]]:
    """(where, text) of every string literal in c10/ and rules/ (f-string holes become {})."""
    out = []
    for path in sorted([*ROOT.glob("c10/**/*.py"), *ROOT.glob("rules/*.py")]):
        tree = ast.parse(path.read_text())
        strings = [n for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)]
        inside = {id(v) for s in strings for v in s.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}"
                               for v in node.values)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in inside):
                text = node.value
            else:
                continue
            out.append((f"{path.relative_to(ROOT)}:{node.lineno}", text))
    return out


def _key_ok(section: str, key: str, sub: str | None) -> bool:
    if section == "area":
        return key in AREA
    if section == "models":
        return sub is None or sub in MODEL
    if key == "{}":  # an f-string hole: the loop that fills it is over real fields
        return True
    return key in {f.name for f in dataclasses.fields(SECTIONS[section])}


def test_every_config_key_named_exists():
    wrong = [f"{where}: {m.group(0)}" for where, text in messages() for m in KEY.finditer(text)
             if not _key_ok(*m.groups())]
    assert wrong == []


def _commands() -> dict[str, set[str]]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: {o for a in p._actions for o in a.option_strings}
             for name, p in sub.choices.items()}
    flags[""] = {o for a in parser._actions for o in a.option_strings}
    return flags


def test_every_c10_command_and_flag_named_exists():
    commands, wrong = _commands(), []
    for where, text in messages():
        for m in C10.finditer(text):
            name, rest = m.groups()
            command = "" if name.startswith("--") else name
            used = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*",
                                  (name if not command else "") + rest))
            if command not in commands or used - commands[command]:
                wrong.append(f"{where}: {m.group(0)}")
    assert wrong == []


def test_every_doit_command_named_exists():
    wrong = []
    for where, text in messages():
        for m in DOIT.finditer(text):
            name, rest = m.groups()
            if name[:2] in ("-n", "-P", "-d"):  # `doit -n N ...`: doit's own options
                continue
            flags = set(re.findall(r"--[a-z-]+", rest))
            if name not in DOIT_COMMANDS | TASKS or (flags - {"--apply"} and name != "list"):
                wrong.append(f"{where}: {m.group(0)}")
    assert wrong == []


def test_the_scanner_sees_the_messages():
    texts = [t for _, t in messages()]
    assert any("signing.allowed_keyids" in t for t in texts)
    assert (any("`c10 keygen" in t for t in texts)
            and any("`doit prune --apply`" in t for t in texts))
    assert not _key_ok("signing", "key_path", None) and _key_ok("models", "{}", "calibration")
