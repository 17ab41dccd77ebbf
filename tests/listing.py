"""The files a cache's Manifest lists, its tile lists expanded: what tests compare trees against."""
from __future__ import annotations

from pathlib import Path

from c10.store.layout import MANIFEST_NAME
from c10.trust.manifest import loads_manifest
from c10.trust.tilelists import expand_files


def listed_files(root: Path, data: bytes | None = None) -> list[dict]:
    """Every entry of `root`'s Manifest.json (or of Manifest bytes `data`), unverified."""
    data = data if data is not None else (Path(root) / MANIFEST_NAME).read_bytes()
    manifest = loads_manifest(data)
    return expand_files(Path(root), manifest)
