"""The [models.*] tables of an export, written into c10.toml: every comment and other table kept
(tomlkit), and a table edited by hand never replaced unasked."""
from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from c10.errors import ConfigError


@dataclass
class TablesUpdate:
    """What writing an export's tables into c10.toml changes (nothing is written by planning)."""

    path: Path
    old: str                                           # c10.toml as read
    new: str                                           # c10.toml with the tables written
    added: list[str] = field(default_factory=list)     # model names, in the export's order
    replaced: list[str] = field(default_factory=list)  # c10 init's template or an export's
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)   # ours, for a model this export lacks
    kept: list[str] = field(default_factory=list)      # edited by hand, not this export's: left
    # edited by hand (differs from both the template's and the export's table): name -> unified
    # diff of the table; replaced in `new` only with force
    edited: dict[str, str] = field(default_factory=dict)
    force: bool = False

    @property
    def changed(self) -> bool:
        return self.new != self.old

    def refused(self) -> list[str]:
        """The hand-edited tables that block the write (none with force)."""
        return [] if self.force else list(self.edited)

    def diff(self) -> str:
        """The unified diff of every hand-edited table: c10.toml's, then the export's."""
        return "".join(self.edited.values())

    def summary(self) -> str:
        parts = [f"{', '.join(f'[models.{n}]' for n in names)} {what}"
                 for what, names in (("added", self.added), ("replaced", self.replaced),
                                     ("replaced (edited by hand; --force)",
                                      list(self.edited) if self.force else []),
                                     ("removed (this export has no such model)", self.removed),
                                     ("already as exported", self.unchanged))
                 if names]
        text = f"{self.path}: " + "; ".join(parts) if parts else f"{self.path}: nothing to write"
        if self.kept:
            text += ("; kept as edited by hand (this export writes no such table): "
                     + ", ".join(f"[models.{n}]" for n in self.kept))
        return text


def template_tables() -> str:
    """c10.toml as `c10 init` writes it: its [models.*] tables count as the operator's own only
    once edited."""
    from c10.tools.project import CONFIG_TOML, DEFAULTS

    return CONFIG_TOML.format(**DEFAULTS)


def plan_models_tables(path: Path, tables: str, *, known: Iterable[str] = (),
                       force: bool = False) -> TablesUpdate:
    """c10.toml at `path` with the [models.*] tables of `tables` (TOML text) written into it.

    A table is replaced when c10.toml's equals (in values) the template's (`c10 init`), one in
    `known` (other exports' tables) or the export's own; any other table of that name was edited
    by hand and is replaced only with `force`, its diff in `edited`. Tables of models the export
    does not write are removed when they are ours, else kept. ConfigError when c10.toml is
    missing or not TOML, or when the result would not be a valid c10.toml.
    """
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    path = Path(path)
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no build request here; run `c10 init {path.parent}` "
                          "first") from None
    try:
        doc = tomlkit.parse(old)
    except TOMLKitError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}; fix the file and re-run") from None
    export = tomlkit.parse(tables)["models"]
    ours: dict[str, list] = {}
    for text in (template_tables(), *known):
        for name, table in tomlkit.parse(text).get("models", {}).items():
            ours.setdefault(name, []).append(table.unwrap())
    if "models" not in doc:
        doc.add("models", tomlkit.table(is_super_table=True))
    models = doc["models"]
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: `models` must hold tables like [models.global]; fix it and "
                          "re-run")
    update = TablesUpdate(path, old, old, force=force)
    for name, table in export.items():
        current = models.get(name)
        if current is None:
            update.added.append(name)
        elif current.unwrap() == table.unwrap():
            update.unchanged.append(name)
            continue
        elif current.unwrap() in ours.get(name, []):
            update.replaced.append(name)
        else:
            update.edited[name] = _diff(name, current, table)
            if not force:
                continue
        models[name] = table
    for name in [n for n in ours if n not in export and n in models]:
        if models[name].unwrap() in ours[name]:
            del models[name]
            update.removed.append(name)
        else:
            update.kept.append(name)
    update.new = tomlkit.dumps(doc)
    _check_valid(path, update.new)
    return update


def write_models_tables(update: TablesUpdate) -> None:
    """Write the planned c10.toml (atomically, under the build lock: it is the build's request);
    refuses while hand-edited tables are in the way without force."""
    from c10.store import atomic
    from c10.store.lock import BuildLock

    if update.refused():
        raise refusal(update)
    if not update.changed:
        return
    with BuildLock(update.path.parent):
        if update.path.read_text(encoding="utf-8") != update.old:
            raise ConfigError(f"{update.path} changed while the tables were prepared; run the "
                              "command again")
        atomic.write_text(update.path, update.new)


def refusal(update: TablesUpdate) -> ConfigError:
    names = ", ".join(f"[models.{n}]" for n in update.refused())
    return ConfigError(
        f"{update.path}: {names} differ from both the template's and this export's tables "
        "(edited by hand: the diff is above), so c10 export-models leaves c10.toml as it is",
        f"merge the export's values by hand, or re-run `c10 export-models {update.path.parent} "
        "--force` to replace them")


def _diff(name: str, current, table) -> str:
    header = f"[models.{name}]\n"
    before = (header + current.as_string()).rstrip("\n") + "\n"
    after = (header + table.as_string()).rstrip("\n") + "\n"
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        f"c10.toml [models.{name}]", f"export [models.{name}]"))


def _check_valid(path: Path, text: str) -> None:
    from c10.config import parse_config

    try:
        parse_config(tomllib.loads(text), path.parent.resolve(), str(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: writing the export's tables would not give valid TOML "
                          f"({exc}); edit the [models.*] tables by hand") from None
