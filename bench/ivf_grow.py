"""An IVF index that grows, at up to 10^6 rows (bench/scale.py --grow): train once, a cold index
stage, +1 % of tiles (random holes and a strip) incremental vs full, and warm query latency of the
mmap'd index; the real c10 code paths on synthetic shards written to disk. Prints JSON."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np

from c10.config import Index
from c10.features import ivf
from c10.features.index import Source, encoding_key, grow_index
from c10.features.shards import BASE_FIELDS
from c10.rules.ivf import EncodingStore
from c10.store.layout import shard_relpath

Z, X0, Y0 = 18, 150_000, 90_000


class _Ledger:
    def __init__(self):
        self.files: dict[str, str] = {}


class _Provenance:
    """The build's trust in its own files, as c10.trust.provenance reads them: hashed on read."""

    def __init__(self, root: Path):
        self.root, self.ledger = root, _Ledger()

    def read(self, rel: str, digest: str) -> bytes | None:
        try:
            data = (self.root / rel).read_bytes()
        except OSError:
            return None
        return data if blake3.blake3(data).hexdigest() == digest else None

    def record(self, rel: str, digest: str) -> None:
        self.ledger.files[rel] = digest


class _Build:
    def __init__(self, root: Path):
        self.root, self.provenance = root, _Provenance(root)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 3)


def _cpu_timed(fn):
    """(value, {"wall_s", "cpu_s"}): CPU time too, steadier than wall time on a shared host."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, {"wall_s": round(time.perf_counter() - wall, 3),
                   "cpu_s": round(time.process_time() - cpu, 3)}


def layout(n: int, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of n tiles on a square, and which are the +1 % (half random holes, half a strip of
    whole columns at the east edge, which adds blocks)."""
    side = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    x, y = X0 + i // side, Y0 + i % side
    new = np.zeros(n, bool)
    new[n - n // 200:] = True  # the strip: the last 0.5 %, whole columns
    rng = np.random.default_rng(seed)
    new[rng.choice(n - n // 200, size=n // 200, replace=False)] = True
    return np.stack([x, y], 1), new


def write_shards(root: Path, xy: np.ndarray, desc: np.ndarray, keep: np.ndarray,
                 block: int, only: set | None = None) -> dict[tuple, Path]:
    """Shards of the kept tiles, by block (only: just those blocks); block -> path."""
    sel = np.flatnonzero(keep)
    bx, by = xy[sel, 0] // block, xy[sel, 1] // block
    order = np.lexsort((xy[sel, 1], xy[sel, 0], by, bx))
    sel, bx, by = sel[order], bx[order], by[order]
    cuts = np.flatnonzero(np.diff(bx * 1_000_000 + by)) + 1
    dtype = np.dtype(BASE_FIELDS + [("desc", "<f4", (desc.shape[1],))])
    out = {}
    for part in np.split(np.arange(len(sel)), cuts):
        b = (Z, int(bx[part[0]]), int(by[part[0]]))
        if only is not None and b not in only:
            continue
        rows = np.zeros(len(part), dtype)
        rows["z"], rows["x"], rows["y"] = Z, xy[sel[part], 0], xy[sel[part], 1]
        rows["desc"] = desc[sel[part]]
        path = root / shard_relpath("bench", b)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rows, allow_pickle=False)
        out[b] = path
    return out


def sources(root: Path, shards: dict[tuple, Path]) -> list[Source]:
    """Each shard as the index task sees it: digest from its ref, bytes read and hashed."""
    out = []
    for b, path in sorted(shards.items()):
        data = path.read_bytes()
        out.append(Source(shard_relpath("bench", b), blake3.blake3(data).hexdigest(), 1,
                          lambda p=path: _hashed(p)))
    return out


def _hashed(path: Path) -> bytes:
    data = path.read_bytes()
    blake3.blake3(data).hexdigest()
    return data


def stage(srcs, params, trained, build) -> tuple[bytes, dict, float]:
    """The index stage as rules/ivf.grow runs it (training excluded: `trained` given), with the
    index file written and hashed as refs.publish does."""
    store = EncodingStore(build, "bench")

    def run():
        grown = grow_index(srcs, params, trained, store)
        store.keep({s.logical: encoding_key(s, trained.digest) for s in srcs}, trained.digest)
        (build.root / "index.faiss").write_bytes(grown.index)
        blake3.blake3(grown.index).hexdigest()
        return grown

    grown, seconds = _cpu_timed(run)
    return grown.index, grown.stats, seconds


def latency(path: Path, data: np.ndarray, nprobes: list[int], n_queries: int, seed: int) -> list:
    """Warm single-query top-5 latency of the mmap'd index, and recall@5 of the query's own tile
    (its descriptor lightly perturbed)."""
    import faiss

    from c10.query.mapped import open_index

    faiss.omp_set_num_threads(1)
    raw = path.read_bytes()
    entry = {"path": path.name, "size": len(raw), "blake3": blake3.blake3(raw).hexdigest()}
    del raw
    before = _rss()
    index, open_s = _timed(lambda: open_index(path.parent, entry))
    opened = _rss()
    rng = np.random.default_rng(seed)
    source = rng.choice(len(data), size=n_queries + 100, replace=False)
    noise = rng.standard_normal((len(source), data.shape[1])).astype(np.float32)
    # as bench/scale.py's index figures: the descriptor plus 0.05 of a random unit vector
    queries = data[source] + 0.05 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out = []
    for nprobe in nprobes:
        faiss.extract_index_ivf(index).nprobe = nprobe
        times, hits = [], []
        for i, q in enumerate(queries):
            start = time.perf_counter()
            _, rows = index.search(q[None, :], 5)
            elapsed = time.perf_counter() - start
            if i >= 100:  # the first 100 warm the process and the page cache
                times.append(elapsed)
                hits.append(source[i] in rows[0])
        out.append({"nprobe": nprobe, "recall_own_at_5": round(float(np.mean(hits)), 4),
                    "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
                    "p95_ms": round(float(np.percentile(times, 95)) * 1e3, 3)})
    after = _rss()
    mb = {k: {"opened": round((opened[k] - before[k]) / 1024, 1),
              "after_queries": round((after[k] - before[k]) / 1024, 1)} for k in before}
    return [{"open_mmap_s": open_s, "mapped": type(faiss.downcast_InvertedLists(
        faiss.extract_index_ivf(index).invlists)).__name__, "rss_growth_mb": mb}] + out


def _rss() -> dict[str, int]:
    """kB of this process's resident anonymous and file-backed memory (Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile") if k in fields}


def grow_figures(n: int, dim: int, factory: str, train_sample: int, nprobes: list[int],
                 block: int, clustered, seed: int = 1, n_queries: int = 1000) -> dict:
    params = Index(factory=factory, train_sample=train_sample, nprobe=nprobes[0])
    xy, new = layout(n, block, seed)
    desc = clustered(n, dim, seed)
    sort = np.lexsort((xy[:, 1], xy[:, 0]))  # canonical (z, x, y) order of every tile
    assert (sort == np.arange(n)).all()
    result = {"factory": factory, "n": n, "dim": dim, "block": block, "train_sample": train_sample}
    with tempfile.TemporaryDirectory(prefix="c10-ivf-bench-") as tmp:
        root = Path(tmp)
        old = write_shards(root / "a", xy, desc, ~new, block)
        src_old = sources(root / "a", old)
        ids = np.zeros(int((~new).sum()), [("z", "<u1"), ("x", "<u4"), ("y", "<u4")])
        ids["z"], ids["x"], ids["y"] = Z, xy[~new, 0], xy[~new, 1]
        (data, meta), result["train"] = _cpu_timed(lambda: ivf.train(desc[~new], ids, params))
        trained = ivf.Trained(data, meta)
        build = _Build(root / "a")
        _, cold, result["cold_index_stage"] = stage(src_old, params, trained, build)
        touched = {(Z, int(x) // block, int(y) // block) for x, y in xy[new]}
        changed = write_shards(root / "a", xy, desc, np.ones(n, bool), block, touched)
        src_new = sources(root / "a", old | changed)
        grown, inc, result["incremental_index_stage"] = stage(src_new, params, trained, build)
        clean = _Build(root / "b")
        full, _, result["full_index_stage"] = stage(src_new, params, trained, clean)
        result |= {"shards_before": len(old), "shards_after": len(src_new),
                   "shards_changed": len(changed), "tiles_added": int(new.sum()),
                   "rows_encoded_cold": cold["rows_encoded"], "rows_encoded_incremental":
                   inc["rows_encoded"], "drift_after": inc["drift"],
                   "incremental_equals_full": grown == full, "index_bytes": len(full)}
        (root / "b" / "index.faiss").write_bytes(full)
        result["latency"] = latency(root / "b" / "index.faiss", desc, nprobes, n_queries, seed)
    return result


if __name__ == "__main__":
    print(json.dumps({"see": "bench/scale.py --grow"}))
