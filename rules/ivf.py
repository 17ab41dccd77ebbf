"""An IVF index task's inputs: shards by their refs, the trusted quantizer, the encoding cache."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import blake3
import numpy as np

from c10.rules.shards import published
from c10.store import atomic, refs
from c10.store.layout import IVF_CACHE_DIR, ivf_encoding_relpath


def grow(build, plan, model_plan) -> dict:
    """Update the model's IVF index from its shards (c10.features.index.grow_index) and publish the
    index, its id map and the quantizer it used."""
    from c10.features.index import encoding_key, grow_index

    div, name = plan.config.shards.div, model_plan.model.name
    sources = ([_source(build, rel, div) for rel in sorted(model_plan.shards)]
               + [_source(build, rel, 1) for rel in sorted(model_plan.windows)])
    store = EncodingStore(build, name)
    grown = grow_index(sources, plan.config.index, trusted_quantizer(build, model_plan.trained),
                       store)
    store.keep({s.logical: encoding_key(s, grown.trained.digest) for s in sources},
               grown.trained.digest)
    buf = io.BytesIO()
    np.save(buf, grown.ids, allow_pickle=False)
    data = [grown.index, buf.getvalue(), grown.trained.data, grown.trained.meta_json]
    rels = [*model_plan.index_rels, *model_plan.trained]
    entries = {rel: refs.publish(build.root, rel, d) for rel, d in zip(rels, data)}
    return {"rows": len(grown.ids), "ivf": grown.stats, "refs": published(build, entries)}


def _source(build, rel: str, scale: int):
    """A shard as its ref names it; read (trusted, else refused) only if it must be encoded."""
    from c10.features.index import Source

    entry = refs.read_ref(build.root, rel)
    if entry is None:
        build.provenance.current(rel)  # refuses, naming the missing ref
    return Source(rel, entry["blake3"], scale, lambda: build.provenance.current(rel)[1])


def trusted_quantizer(build, rels: tuple[str, ...]):
    """The quantizer this build or the last signed Manifest made (c10.features.ivf.Trained), or
    None (then the build trains one): a quantizer no one vouches for is never used."""
    from c10.features.ivf import Trained

    found = []
    for rel in rels:
        entry = refs.read_ref(build.root, rel)
        data = build.provenance.read(entry["path"], entry["blake3"]) if entry else None
        if data is None:
            return None
        found.append(data)
    try:
        json.loads(found[1])
    except ValueError:
        return None
    return Trained(*found)


class EncodingStore:
    """Shard encodings under .c10/ivf/{model}/{quantizer}/, used only with the blake3 the host's
    ledger recorded when this host wrote them (an edited or planted one is encoded again)."""

    def __init__(self, build, model: str):
        self.build, self.model = build, model
        self._names: dict[str, dict[str, list[str]]] = {}  # quantizer dir -> slug -> file names

    def _rel(self, logical: str, key: str, quantizer: str) -> str:
        return ivf_encoding_relpath(self.model, quantizer, logical, key)

    def get(self, logical: str, key: str, quantizer: str) -> bytes | None:
        return self._trusted(self._rel(logical, key, quantizer))

    def previous(self, logical: str, key: str, quantizer: str) -> bytes | None:
        """The shard's last encoding with this quantizer (its unchanged rows keep their codes)."""
        parent, name = self._rel(logical, key, quantizer).rsplit("/", 1)
        for other in self._listing(parent).get(name.rsplit(".", 2)[0], ()):
            if (data := self._trusted(f"{parent}/{other}")) is not None:
                return data
        return None

    def _listing(self, parent: str) -> dict[str, list[str]]:
        """The encodings in one quantizer's directory by shard, listed once per build."""
        if parent not in self._names:
            names: dict[str, list[str]] = {}
            try:
                entries = sorted(os.listdir(Path(self.build.root) / parent))
            except OSError:
                entries = []
            for entry in entries:
                names.setdefault(entry.rsplit(".", 2)[0], []).append(entry)
            self._names[parent] = names
        return self._names[parent]

    def _trusted(self, rel: str) -> bytes | None:
        digest = self.build.provenance.ledger.files.get(rel)
        return self.build.provenance.read(rel, digest) if digest else None

    def put(self, logical: str, key: str, quantizer: str, data: bytes) -> None:
        # written in place, not fsynced: a torn or stale file fails its ledger hash and is
        # encoded again (a cache; the atomic writer's temp file and fsync cost ~1 ms a shard)
        rel = self._rel(logical, key, quantizer)
        atomic.write_unsynced(Path(self.build.root) / rel, data)
        self.build.provenance.record(rel, blake3.blake3(data).hexdigest())

    def keep(self, logicals_keys: dict[str, str], quantizer: str) -> None:
        """Keep only the current quantizer's encodings of the index's shards."""
        top = Path(self.build.root) / IVF_CACHE_DIR / self.model
        wanted = {self._rel(logical, key, quantizer) for logical, key in logicals_keys.items()}
        for path in sorted(top.rglob("*.rows")) if top.is_dir() else ():
            if path.relative_to(self.build.root).as_posix() not in wanted:
                path.unlink(missing_ok=True)
        for sub in top.iterdir() if top.is_dir() else ():
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
