"""Figures for docs/scale.md: FAISS index build (HNSW vs IVF-PQ) at up to 1e5 x dim, and a flat
Manifest vs a tree of per-block sub-manifests under one root; with --grow, an IVF index that grows
at --tiles rows (bench/ivf_grow.py: train, cold, +1 % incremental vs full, warm mmap'd query
latency); prints JSON. Synthetic clustered unit vectors."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import blake3
import numpy as np

from c10.canonical import canonical_json
from c10.trust import manifest as mf


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def clustered(n: int, dim: int, seed: int, centres: int = 2000) -> np.ndarray:
    """Unit vectors around `centres` random centres: closer to real descriptors than uniform
    noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_index(factory: str, data: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                source: np.ndarray) -> dict:
    """Train and add timed apart (train cost depends on the sample, add on n), one thread as in
    c10.features.index.make_index; recall@10 against exact search, and how often the query's own
    tile is in the top 10."""
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efConstruction, hnsw.efSearch = 40, 64
    _, train = _timed(lambda: index.is_trained or index.train(data))
    _, add = _timed(lambda: index.add(data))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = 16
    (_, found), search = _timed(lambda: index.search(queries, 10))
    return {"factory": factory, "n": len(data), "train_s": round(train, 2), "add_s": round(add, 2),
            "bytes": len(faiss.serialize_index(index)),
            "query_ms": round(search / len(queries) * 1e3, 3),
            "recall_at_10": round(float(np.mean([len(set(f) & set(t)) / 10
                                                 for f, t in zip(found, truth)])), 3),
            "own_tile_in_top10": round(float(np.mean([s in f for s, f in zip(source, found)])), 3)}


def index_figures(sizes: list[int], dim: int, factories: list[str]) -> list[dict]:
    import faiss

    out = []
    for n in sizes:
        data = clustered(n, dim, seed=1)
        source = np.random.default_rng(2).integers(0, n, 200)  # a camera frame near a known tile
        queries = data[source] + 0.05 * clustered(200, dim, seed=3)
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        exact = faiss.IndexFlatIP(dim)
        exact.add(data)
        _, truth = exact.search(queries, 10)
        out += [bench_index(f, data, queries, truth, source) for f in factories]
    return out


def entries(n: int, block: int = 16) -> list[mf.FileEntry]:
    """`n` tile entries laid out as a square at zoom 18 (the shape a real sector has)."""
    side = int(np.ceil(np.sqrt(n)))
    return [mf.FileEntry(f"tiles/18/{140000 + i // side}/{90000 + i % side}.jpg", 20_000 + i % 997,
                         blake3.blake3(i.to_bytes(8, "little")).hexdigest(), "tile")
            for i in range(n)]


def manifest_figures(n: int, block: int) -> dict:
    files = entries(n)
    flat, flat_s = _timed(lambda: canonical_json(sorted((f.to_json() for f in files),
                                                        key=lambda e: e["path"])))
    _, parse_s = _timed(lambda: json.loads(flat))
    groups: dict[str, list[dict]] = defaultdict(list)
    for f in files:
        _, z, x, _y = f.path.split("/")
        y = int(_y.split(".")[0])
        groups[f"{z}/{int(x) // block}-{y // block}"].append(f.to_json())

    def tree():
        subs = {name: canonical_json(sorted(g, key=lambda e: e["path"]))
                for name, g in groups.items()}
        root = canonical_json([{"block": k, "blake3": blake3.blake3(v).hexdigest(), "size": len(v),
                                 "files": len(groups[k])} for k, v in sorted(subs.items())])
        return subs, root

    (subs, root), tree_s = _timed(tree)
    one = next(iter(groups))
    _, one_s = _timed(lambda: canonical_json(sorted(groups[one], key=lambda e: e["path"])))
    _, root_s = _timed(lambda: blake3.blake3(root).hexdigest())
    return {"entries": n, "block": block, "flat_bytes": len(flat), "flat_dumps_s": round(flat_s, 3),
            "flat_parse_s": round(parse_s, 3), "blocks": len(subs),
            "tree_sub_bytes": sum(map(len, subs.values())),
            "tree_root_bytes": len(root), "tree_build_s": round(tree_s, 3),
            "tree_one_block_rewrite_s": round(one_s + root_s, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="25000,50000,100000")
    parser.add_argument("--dim", type=int, default=256,
                        help="the demo global model's descriptor size")
    parser.add_argument("--factories", default="HNSW32,Flat;HNSW32,SQ8;IVF1024,PQ32;IVF1024,PQ64")
    parser.add_argument("--manifest", type=int, default=100_000)
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--grow", action="store_true",
                        help="only the growing IVF index figures (bench/ivf_grow.py)")
    parser.add_argument("--tiles", type=int, default=1_000_000, help="rows for --grow")
    parser.add_argument("--grow-factories", default="IVF1024,SQ8", help="';'-separated")
    parser.add_argument("--train-sample", type=int, default=65536)
    parser.add_argument("--nprobes", default="4,8,16,32")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    if args.grow:
        from ivf_grow import grow_figures

        nprobes = [int(v) for v in args.nprobes.split(",")]
        figures = [grow_figures(args.tiles, args.dim, f, args.train_sample, nprobes, args.block,
                                clustered, n_queries=args.queries)
                   for f in args.grow_factories.split(";")]
        print(json.dumps({"bench": "scale-grow", "cpus": os.cpu_count(), "grow": figures,
                          "loadavg": [round(v, 2) for v in os.getloadavg()]}, indent=2))
        return
    result = {"bench": "scale", "cpus": os.cpu_count(), "python": sys.version.split()[0],
              "manifest": manifest_figures(args.manifest, 16)}
    if not args.skip_index:
        result["index"] = index_figures([int(s) for s in args.sizes.split(",")], args.dim,
                                        args.factories.split(";"))
    result["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
