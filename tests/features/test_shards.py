"""Shards: the pipelined embedder against one-by-one inference, reuse of unchanged rows, exact
bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import current
from PIL import Image

from c10.errors import DescriptorBatchError
from c10.features import engines
from c10.features.descriptor_store import DescriptorStore, Source
from c10.features.embedding import _batch, _staggered, embed_tiles, l2_normalize
from c10.features.preprocess import Preprocessing, load_tensor
from c10.features.shards import (
    DESCRIPTORS,
    TileRecord,
    build_shard,
    pack_shard,
    read_shard,
    tile_facts,
)
from c10.store.digest import blake3_file
from c10.store.tiles import Tile
from c10.tools import netgen

PREP = Preprocessing((32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IDENT = "ab" * 32


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """A real onnxruntime engine of a tiny generated global model."""
    d = tmp_path_factory.mktemp("engine")
    onnx = netgen.write_global_model(d / "g.onnx", input_size=32, dim=16)
    spec = engines.EngineSpec(model="g", onnx_path=onnx, onnx_hash=blake3_file(onnx),
                              input_shape=(3, 32, 32), batch=(1, 4, 64))
    backend = engines.get_backend("onnxruntime")
    path, _ = engines.build_engine(spec, backend, d / "engines")
    return engines.load_engine(path, spec, backend)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(11):
        path = d / "15" / "3" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), np.uint8)).save(path, "JPEG")
        paths.append(path)
    return paths


def one_by_one(runner, paths) -> np.ndarray:
    return l2_normalize(np.concatenate([runner(load_tensor(p, PREP)[None]) for p in paths]))


@pytest.mark.parametrize("batch, workers", [(4, 1), (4, 2), (32, 2), (1, 3)])
def test_pipeline_gives_the_one_by_one_descriptors_in_order(runner, tiles, batch, workers):
    seen = []
    desc = embed_tiles(runner, tiles, PREP, batch, workers=workers, progress=seen.append)
    assert desc.shape == (11, 16) and desc.dtype == np.float32
    np.testing.assert_allclose(desc, one_by_one(runner, tiles), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    assert sum(seen) == 11


@pytest.mark.parametrize("n, batch, workers, size", [(256, 32, 2, 32), (200, 32, 2, 25),
                                                     (10, 32, 2, 5), (1, 32, 4, 1), (11, 4, 3, 4),
                                                     (64, 32, 1, 32)])
def test_batches_split_evenly_over_the_workers(n, batch, workers, size):
    """At most `batch` tiles a batch, and no worker runs the last batch alone while the others
    idle."""
    assert _batch(n, batch, workers) == size
    assert -(-n // size) % workers == 0 or n < workers


@pytest.mark.parametrize("n, batch, workers", [(256, 32, 2), (200, 32, 2), (256, 32, 4),
                                                (1000, 32, 3), (10, 32, 2), (64, 32, 1)])
def test_staggered_batches_start_the_workers_apart_and_end_them_together(n, batch, workers):
    """Handed to whichever worker is free first (as the pool does), at a cost proportional to
    size: the workers start their second batch a fraction of a batch apart and finish within two
    tiles of each other."""
    size = _batch(n, batch, workers)
    sizes = _staggered(n, size, workers)
    assert sum(sizes) == n and max(sizes) <= size and min(sizes) > 0
    free = [0.0] * workers
    for s in sizes:
        free[free.index(min(free))] += s
    if -(-n // size) >= 2 * workers:
        # every worker's first batch ends at another time
        assert len(set(sizes[:workers])) == workers
        assert max(free) - min(free) <= 2
    else:  # too few batches to stagger: the even split
        assert sizes == [min(size, n - i) for i in range(0, n, size)]


def test_a_corrupt_tile_fails_the_batch_naming_it(runner, tiles, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(tiles[0].read_bytes()[:200])
    with pytest.raises(DescriptorBatchError, match="bad.jpg.*re-download or delete"):
        embed_tiles(runner, [*tiles[:6], bad, *tiles[6:]], PREP, 4)


def records(root: Path, paths) -> list[TileRecord]:
    return [TileRecord(Tile(15, 3, int(p.stem), p.relative_to(root).as_posix()), p.stat().st_size,
                       blake3_file(p))
            for p in sorted(paths, key=lambda p: int(p.stem))]


def earlier(data: bytes, ident: str = IDENT, logical: str = "shards/g/15/0-0.npy"):
    """reuse() over one trusted earlier shard of `logical` (its bytes), as a build's store gives
    it."""
    store = DescriptorStore([Source(Path("/nonexistent/earlier.npy"), lambda: data, logical)])
    return store.reuser(ident, DESCRIPTORS.columns, logical)


class Counting:
    """The real pipeline, counting the tiles it is asked to embed."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, paths):
        self.calls.append(len(paths))
        return (embed_tiles(self.runner, paths, PREP, 4),)


def test_rebuild_embeds_only_new_or_changed_tiles(runner, tiles):
    root = tiles[0].parents[2]
    embed = Counting(runner)
    first = build_shard(root, "shards/g/15/0-0.npy", records(root, tiles[:8]), embed, IDENT)
    assert (first.embedded, first.reused) == (8, 0)
    recs = records(root, tiles[:9])
    before = current(root, "shards/g/15/0-0.npy").read_bytes()  # the trusted earlier shard
    again = build_shard(root, "shards/g/15/0-0.npy", recs, embed, IDENT, reuse=earlier(before))
    assert (again.embedded, again.reused) == (1, 8) and embed.calls == [8, 1]
    assert (again.entry["path"] == f"shards/g/15/0-0.{again.entry['blake3'][:16]}.npy"
            != first.entry["path"])
    rows = read_shard(current(root, "shards/g/15/0-0.npy"))
    np.testing.assert_allclose(rows["desc"], one_by_one(runner, tiles[:9]), atol=1e-5)
    changed = [recs[0].__class__(r.tile, r.size, "00" * 32) if i == 3 else r
               for i, r in enumerate(recs)]
    nine = current(root, "shards/g/15/0-0.npy").read_bytes()
    assert build_shard(root, "shards/g/15/0-0.npy", changed, embed, IDENT,
                       reuse=earlier(nine)).embedded == 1
    assert build_shard(root, "shards/g/15/0-0.npy", changed, embed, "cd" * 32,
                       reuse=earlier(nine, "cd" * 32)).embedded == 9
    assert build_shard(root, "shards/g/15/0-0.npy", recs, embed, IDENT).embedded == 9  # no trust


def test_shard_bytes_are_deterministic_and_carry_the_tile_facts(runner, tiles):
    root = tiles[0].parents[2]
    recs = records(root, tiles)
    desc = embed_tiles(runner, tiles, PREP, 4)
    data = pack_shard(recs, [desc], IDENT)
    assert data == pack_shard(recs, [embed_tiles(runner, tiles, PREP, 4, workers=1)], IDENT)
    out = root / "one.npy"
    out.write_bytes(data)
    facts = tile_facts(out)
    assert facts == {r.tile.id: (r.size, r.blake3) for r in recs}
    rows = read_shard(out)
    assert ([tuple(map(int, (r["z"], r["x"], r["y"]))) for r in rows]
            == [tuple(r.tile.id) for r in recs])
    assert all(bytes(r["ident"]) == bytes.fromhex(IDENT)[:8] for r in rows)
