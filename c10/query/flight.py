"""A cache as the aircraft uses it: its verified Manifest and the files it lists, nothing else."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Iterable

from c10.errors import ConfigError, VerifyError
from c10.store.layout import MANIFEST_NAME, TILES_DIR
from c10.store.tiles import TileId
from c10.trust.files import read_listed
from c10.trust.runtime import ModelSpec, RuntimeSpec, parse_runtime
from c10.trust.tilelists import iter_files

_BUILD_AGAIN = "rebuild the cache with this c10 (`doit build_cache`) and copy it again"


@dataclass
class FlightCache:
    """A cache whose Manifest verified against trusted keys. Every file is read through `read`:
    opened once, its size and blake3 checked against the Manifest, then used from those bytes.
    c10.toml, `.c10/` and any unlisted file are never read."""

    root: Path
    manifest: dict
    runtime: RuntimeSpec
    entries: dict[str, dict] = field(repr=False)
    _opened: dict = field(default_factory=dict, repr=False)
    # the index is mapped (IO_FLAG_MMAP, c10.query.mapped), not read into memory: False reads it
    mmap_index: bool = True

    @classmethod
    def open(cls, root: str | Path, trusted_keys: Iterable | dict, *, now: datetime | None = None,
             state_path: Path | None = None, full: bool = False,
             airborne: bool = False) -> FlightCache:
        """Verify the Manifest (signature, payload, freshness) and parse its runtime spec.

        trusted_keys: public key files, raw 64-hex keys, or {keyid: key}. full: first verify the
        whole tree as `c10 verify` does (airborne: strictly, as on the aircraft)."""
        from c10.trust.keys import load_trusted_keys
        from c10.trust.verify import verify_cache, verify_signed_manifest

        root = Path(root)
        trusted = (trusted_keys if isinstance(trusted_keys, dict)
                   else load_trusted_keys(trusted_keys))
        now = now or datetime.now(timezone.utc)
        if full:
            from c10.features.backends import host_fingerprints

            verify_cache(root, trusted=trusted, now=now, state_path=state_path,
                         airborne_fingerprints=host_fingerprints() if airborne else None)
        manifest = verify_signed_manifest(root, trusted=trusted, now=now, state_path=state_path)
        entries = {f["path"]: f for f in iter_files(root, manifest)}
        return cls(root, manifest, parse_runtime(manifest, set(entries)), entries)

    def read(self, rel: str) -> bytes:
        """The bytes of a listed file, checked against the Manifest as they are read."""
        entry = self.entries.get(rel)
        if entry is None:
            raise VerifyError("missing-file", f"{rel} is not listed in {MANIFEST_NAME}", rel)
        return read_listed(self.root, entry)

    def model(self, name: str | None = None, role: str = "global") -> ModelSpec:
        """The named model of `role` (default: the first one of that role)."""
        models = self.runtime.role(role)
        if not models:
            raise ConfigError(f"{self.root}: the Manifest signs no model with role {role!r}",
                              _BUILD_AGAIN)
        if name is None:
            return models[0]
        for spec in models:
            if spec.name == name:
                return spec
        raise ConfigError(f"{self.root}: no {role} model {name!r}; the Manifest signs "
                          f"{', '.join(m.name for m in models)}")

    def runner(self, spec: ModelSpec):
        """The model's engine, loaded from its signed bytes (kept for this cache's lifetime)."""
        if spec.name not in self._opened:
            from c10.features.backends import get_backend
            from c10.features.engines import load_signed_engine

            self._opened[spec.name] = load_signed_engine(
                spec.name, self.read(spec.engine), self.read(spec.sidecar), spec.key,
                get_backend(spec.backend))
        return self._opened[spec.name]

    @cached_property
    def tiles(self) -> dict[TileId, str]:
        """Tile id -> listed path of every tile the Manifest lists."""
        out = {}
        for rel, entry in self.entries.items():
            if entry["kind"] == "tile":
                z, x, name = rel.removeprefix(TILES_DIR + "/").split("/")
                out[TileId(int(z), int(x), int(name.split(".")[0]))] = rel
        return out

    def load_tile(self, tile: TileId):
        """A listed tile's image, decoded as the build decodes tiles."""
        from c10.features.preprocess import open_tile

        return open_tile(io.BytesIO(self.read(self.tiles[tile])))

    def searcher(self, model: str | None = None):
        """(Searcher, model name) of a global model: its engine, preprocessing and index."""
        from c10.query.search import Searcher

        spec = self.model(model)
        index, ids = self._index(spec)
        searcher = Searcher(self.runner(spec), preprocessing(spec), index, ids, spec.index.metric,
                            self.tiles, spec.batch_size, div=spec.index.div)
        return searcher, spec.name

    def _index(self, spec: ModelSpec):
        import faiss
        import numpy as np

        from c10.query.mapped import open_index

        entry = self.entries.get(spec.index.index)
        if entry is None:
            raise VerifyError("missing-file", f"{spec.index.index} is not listed in "
                              f"{MANIFEST_NAME}", spec.index.index)
        index = open_index(self.root, entry, self.mmap_index)
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = spec.index.ef_search
        ids = np.load(io.BytesIO(self.read(spec.index.ids)), allow_pickle=False)
        if len(ids) != index.ntotal:
            raise VerifyError("bad-manifest", f"{spec.index.ids} maps {len(ids)} rows, the index "
                              f"holds {index.ntotal}; {_BUILD_AGAIN}", spec.index.ids)
        return index, ids

    def reranker(self, matching: str = "mnn"):
        """Reranker over the first local model (`c10 query --rerank`) and, for matching =
        "lightglue", the first matcher model; c10.query.rerank.MATCHING says what each costs."""
        from c10.query.rerank import MATCHING, Reranker

        if matching not in MATCHING:
            raise ConfigError(f"--matcher {matching!r}: allowed: {', '.join(MATCHING)}")
        roles = ("local", "matcher") if matching == "lightglue" else ("local",)
        missing = [r for r in roles if not self.runtime.role(r)]
        if missing:
            needs = " and one with role = \"matcher\"" if matching == "lightglue" else ""
            raise ConfigError(f"{self.root}: --rerank needs a model with role = \"local\"{needs} "
                              f"(missing: {', '.join(missing)})",
                              "`c10 export-models` writes them and prints their tables; then "
                              "rebuild the cache")
        local = self.runtime.role("local")[0]
        matcher = self.runner(self.runtime.role("matcher")[0]) if matching == "lightglue" else None

        def shard(logical: str) -> bytes:
            rel = local.shards.get(logical)
            if rel is None:
                raise VerifyError("missing-file", f"the Manifest signs no local shard {logical}",
                                  logical)
            return self.read(rel)

        return Reranker(self.runner(local), preprocessing(local), matcher, local.name,
                        self.runtime.block, shard, self.tiles, matching)

    def query(self, image, k: int = 5, model: str | None = None):
        """Top-k tiles for an image file (path) of a camera frame."""
        return self.searcher(model)[0].query_file(Path(image), k)


def preprocessing(spec: ModelSpec):
    """The signed preprocessing of a model, refused if this c10 computes it differently."""
    from c10.config import DECODE_MODES, PREPROCESSING_CODE
    from c10.features.preprocess import Preprocessing

    prep = spec.preprocessing
    decode = prep.get("decode", "full")
    if prep["code"] != PREPROCESSING_CODE or not prep["input_size"] or decode not in DECODE_MODES:
        raise VerifyError("schema-version", f"model {spec.name} was embedded by preprocessing "
                          f"code {prep['code']} (decode {decode!r}), this c10 computes "
                          f"{PREPROCESSING_CODE} (decode {' or '.join(DECODE_MODES)}); "
                          f"{_BUILD_AGAIN}", MANIFEST_NAME)
    return Preprocessing(tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]),
                         prep["channel_order"], prep["resize"], decode)
