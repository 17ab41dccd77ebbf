"""Bench: the Manifest flat (schema 2) vs tree (schema 3): write, verify and a 1 % rewrite, each in
its own process for its peak RSS, at 10^5 and 10^6 synthetic tile entries (prints JSON).

Run as `python bench/manifest.py --tree [--sizes 100000,1000000] [--repeat 3]`. Synthetic: the tile
files are not on disk, so "verify" is the Manifest's share of `c10 verify` (signature, payload,
parse, every tile list read against its root entry and parsed strictly, every path checked), not
the hashing of the tiles themselves (bench/manifest.py's other figures)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from c10.trust import manifest as mf
from c10.trust.keys import keyid

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
BLOCK = 16
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # a bench key, never a real one
STAGES = ("write_flat", "write_tree", "verify_flat", "verify_tree", "rewrite_flat", "rewrite_tree")


def blocks(n: int) -> list[tuple[int, int, int]]:
    """The blocks of `n` tiles laid out as a square at zoom 18 (a sector's shape)."""
    side = -(-int(n ** 0.5) // BLOCK)
    return [(18, 8750 + bx, 5625 + by) for bx in range(side) for by in range(side)][
        : -(-n // (BLOCK * BLOCK))]


def block_tiles(block: tuple[int, int, int], salt: bytes = b"") -> list[tuple[str, int, str]]:
    """A block's synthetic (path, size, blake3) rows; another `salt`: other tile bytes."""
    z, bx, by = block
    out = []
    for x in range(bx * BLOCK, (bx + 1) * BLOCK):
        for y in range(by * BLOCK, (by + 1) * BLOCK):
            digest = blake3.blake3(b"%d/%d%s" % (x, y, salt)).hexdigest()
            out.append((f"tiles/{z}/{x}/{y}.jpg", 20_000 + (7 * x + y) % 997, digest))
    return out


def changed(n: int) -> set[tuple[int, int, int]]:
    """1 % of the blocks, spread over the sector (what +1 % of tiles touches at best)."""
    all_blocks = blocks(n)
    return set(all_blocks[::100])


def _others() -> list[mf.FileEntry]:
    """What a real root lists beside the tiles: a model, an engine, an index, some shards."""
    return [mf.FileEntry("models/global.onnx", 1 << 20, "11" * 32, "model"),
            mf.FileEntry("index/global.0123456789abcdef.faiss", 1 << 26, "22" * 32, "index")]


def _sign(root: Path, files: list[mf.FileEntry], schema: int, version: int, tiles_hash: str):
    body = mf.build_manifest(
        version=version, issued_at=T0, expires=T0 + timedelta(days=30), build_identity="bench",
        request={"bench": True}, host={"os": "Linux"}, tools={"c10": "bench"},
        tiles_hash=tiles_hash, files=files, cache_id="bench", schema=schema,
        runtime={"tiles": {"block": BLOCK}})
    mf.write_signed_manifest(root, mf.dumps_manifest(body), KEY)


def write_flat(root: Path, n: int, salted: set | None = None, version: int = 1) -> dict:
    files = _others()
    for block in blocks(n):
        salt = b"v2" if salted and block in salted else b""
        files += [mf.FileEntry(p, s, d, "tile") for p, s, d in block_tiles(block, salt)]
    _sign(root, files, 2, version, mf.tiles_aggregate_hash(files))
    return {"entries": len(files), "manifest_bytes": (root / "Manifest.json").stat().st_size}


def write_tree(root: Path, n: int, salted: set | None = None, version: int = 1) -> dict:
    """As the build writes it: one block at a time, a list written only if its bytes are new."""
    from c10.trust.tilelists import LIST_KIND, tree_tiles_hash, write_tile_list

    files, written = _others(), 0
    before = {p.relative_to(root).as_posix() for p in root.glob("tilelists/*/*.json")}
    for block in blocks(n):
        salt = b"v2" if salted and block in salted else b""
        rel, size, digest = write_tile_list(root, block, block_tiles(block, salt))
        written += rel not in before  # content-named: new bytes, new name
        files.append(mf.FileEntry(rel, size, digest, LIST_KIND))
    _sign(root, files, 3, version, tree_tiles_hash(files))
    return {"root_entries": len(files), "lists_written": written,
            "manifest_bytes": (root / "Manifest.json").stat().st_size,
            "lists_bytes": sum(f.size for f in files if f.kind == LIST_KIND)}


def verify(root: Path) -> dict:
    from c10.trust.hashing import check_paths
    from c10.trust.tilelists import expand_files
    from c10.trust.verify import verify_signed_manifest

    manifest = verify_signed_manifest(root, trusted={keyid(KEY): KEY.public_key()},
                                      now=T0 + timedelta(days=1))
    check_paths(manifest["files"])
    files = expand_files(root, manifest)
    check_paths(files)
    listed = {f["path"] for f in files}  # what the coverage walk compares the tree against
    return {"entries": len(listed)}


def run_stage(stage: str, n: int, root: Path) -> dict:
    """One stage in this process: its wall time and this process's peak RSS."""
    start = time.perf_counter()
    kind = stage.split("_")[1]
    if stage.startswith("write"):
        out = (write_flat if kind == "flat" else write_tree)(root, n)
    elif stage.startswith("verify"):
        out = verify(root)
    else:  # the next build with 1 % of the blocks' tiles changed
        out = (write_flat if kind == "flat" else write_tree)(root, n, changed(n), version=2)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1), **out}


def _child(stage: str, n: int, root: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--stage", stage, str(n), str(root)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def bench(sizes: list[int], repeat: int) -> dict:
    """Each size: per repeat, fresh flat and tree roots through every stage, interleaved (flat,
    tree, flat, tree...) so a noisy neighbour hits both alike; medians reported."""
    tmp = Path(tempfile.mkdtemp(prefix="c10-bench-tree-"))
    out = []
    try:
        for n in sizes:
            runs: dict[str, list[dict]] = {s: [] for s in STAGES}
            for _ in range(repeat):
                roots = {"flat": tmp / f"flat-{n}", "tree": tmp / f"tree-{n}"}
                for r in roots.values():
                    shutil.rmtree(r, ignore_errors=True)
                    (r / ".c10").mkdir(parents=True)
                for step in ("write", "verify", "rewrite"):
                    for kind in ("flat", "tree"):
                        runs[f"{step}_{kind}"].append(_child(f"{step}_{kind}", n, roots[kind]))
            out.append({"tiles": n, "block": BLOCK, "repeat": repeat,
                        **{s: _median(r) for s, r in runs.items()}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bench": "manifest-tree", "cpus": os.cpu_count(), "sizes": out,
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def _median(runs: list[dict]) -> dict:
    return {k: (round(statistics.median(r[k] for r in runs), 3)
                if isinstance(runs[0][k], float) else runs[0][k]) for k in runs[0]}


if __name__ == "__main__" and sys.argv[1:2] == ["--stage"]:
    print(json.dumps(run_stage(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))))
