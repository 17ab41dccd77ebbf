"""c10.features.windows: which windows a scope makes (edges, gaps, blocks), their pixels cut from
the mosaic, their row keys; the id map in 1/div tile; shards.stride and the signed div checked."""
from __future__ import annotations

import numpy as np
import pytest

from c10.config import parse_config
from c10.errors import ConfigError, VerifyError
from c10.features.index import load_descriptors
from c10.features.shards import TileRecord, pack_shard
from c10.features.window_grid import Window, plan_windows, window_blocks, window_key
from c10.features.windows import window_pixels
from c10.store.tiles import Tile
from c10.trust.runtime import parse_runtime

pytestmark = pytest.mark.timeout(30)


def grid(xs, ys, z: int = 15, missing=()) -> list[Tile]:
    return sorted(Tile(z, x, y, f"tiles/{z}/{x}/{y}.jpg") for x in xs for y in ys
                  if (x, y) not in missing)


def test_windows_need_every_tile_they_cover():
    tiles = grid(range(8, 11), range(4, 6), missing={(10, 5)})
    windows = [w for ws in plan_windows(tiles, 16, 2).values() for w in ws]
    ids = {(w.x, w.y) for w in windows}
    # a 3x2 grid without its lower-right tile: between columns, between rows, and the one 2x2
    assert ids == {(17, 8), (19, 8), (17, 10), (16, 9), (18, 9), (17, 9)}
    assert all(len(w.tiles) == (4 if w.x % 2 and w.y % 2 else 2) for w in windows)
    assert not plan_windows(tiles, 16, 1)  # stride 1: tiles only


def test_a_window_belongs_to_the_block_of_its_top_left_tile():
    tiles = grid(range(0, 5), range(0, 5))
    blocks = plan_windows(tiles, 4, 2)
    edge = next(w for w in blocks[(15, 0, 0)] if (w.x, w.y) == (7, 7))
    assert [t[1:3] for t in edge.tiles] == [(3, 3), (4, 3), (3, 4), (4, 4)]  # reaches blocks 1
    # the last tile (4, 4), alone in its block, has no right or lower neighbour: no windows there
    assert set(blocks) == {(15, 0, 0), (15, 1, 0), (15, 0, 1)}
    assert all(w.x // 2 // 4 == b[1] and w.y // 2 // 4 == b[2]
               for b, ws in blocks.items() for w in ws)
    assert all([(w.x, w.y) for w in ws] == sorted((w.x, w.y) for w in ws) for ws in blocks.values())


@pytest.mark.parametrize("seed", range(4))
def test_the_graphs_covered_tiles_decide_exactly_the_blocks_windows(seed):
    """window_blocks (numpy, on every load) against plan_windows (the definition), with holes,
    two zooms, any order."""
    rng = np.random.default_rng(seed)
    for _ in range(10):
        tiles = [t for z in (14, 15) for t in grid(range(5, 5 + rng.integers(1, 12)),
                                                   range(3, 3 + rng.integers(1, 12)), z)
                 if rng.random() < 0.8]
        block, div = int(rng.choice([1, 2, 3, 4, 16])), int(rng.integers(2, 5))
        made = window_blocks([tiles[i] for i in rng.permutation(len(tiles))], block, div)
        defined = plan_windows(sorted(tiles), block, div)
        assert list(made) == list(defined)
        for key, windows in defined.items():
            assert made[key].tiles == sorted({t for w in windows for t in w.tiles})
            assert made[key].windows(block, div) == windows
    assert window_blocks(grid(range(3), range(3)), 4, 1) == {}


@pytest.mark.parametrize("div", [2, 3, 4])
def test_a_window_is_the_mosaic_cut_at_its_offset(div):
    rng = np.random.default_rng(div)
    size = 12
    tiles = grid((0, 1), (0, 1))
    pixels = {t: rng.integers(0, 256, (size, size, 3), np.uint8) for t in tiles}
    at = {(t.x, t.y): pixels[t] for t in tiles}
    mosaic = np.concatenate([np.concatenate([at[(0, y)], at[(1, y)]], axis=1) for y in (0, 1)])
    windows = [w for ws in plan_windows(tiles, 16, div).values() for w in ws]
    assert len(windows) == div * div - 1 + 2 * (div - 1)  # the 2x2, then the right and low edge
    for w in windows:
        top, left = w.y * size // div, w.x * size // div
        assert np.array_equal(window_pixels(w, div, pixels.__getitem__),
                              mosaic[top:top + size, left:left + size]), (w.x, w.y)


def test_a_covered_tile_of_another_size_is_resized_to_the_first():
    a, b = grid((0, 1), (0,))
    pixels = {a: np.zeros((8, 8, 3), np.uint8), b: np.full((16, 16, 3), 200, np.uint8)}
    out = window_pixels(Window(15, 1, 0, (a, b)), 2, pixels.__getitem__)
    assert out.shape == (8, 8, 3) and (out[:, :4] == 0).all() and (out[:, 4:] == 200).all()


def test_a_window_key_changes_with_any_covered_tile_and_names_the_offset_not_the_stride():
    a, b = grid((0, 1), (0,))
    digests = ["11" * 32, "22" * 32]
    half = window_key(Window(15, 1, 0, (a, b)), 2, digests)
    assert half == window_key(Window(15, 2, 0, (a, b)), 4, digests)  # 1/2 == 2/4: one row
    assert half != window_key(Window(15, 1, 0, (a, b)), 4, digests)
    assert half != window_key(Window(15, 1, 0, (a, b)), 2, [digests[0], "33" * 32])
    assert half != window_key(Window(15, 1, 0, (a, b)), 2, digests[::-1])
    assert half not in digests and len(bytes.fromhex(half)) == 32


def _shard(ids, value: float) -> bytes:
    records = [TileRecord(Tile(15, x, y, ""), 0, "00" * 32) for x, y in ids]
    return pack_shard(records, [np.full((len(ids), 4), value, np.float32)], "ab" * 32)


def test_the_id_map_counts_in_1_over_div_tile():
    import io

    tiles, windows = io.BytesIO(_shard([(3, 5), (4, 5)], 1.0)), io.BytesIO(_shard([(7, 10)], 2.0))
    desc, ids = load_descriptors([tiles], [windows], 2)
    assert [tuple(map(int, r)) for r in ids] == [(15, 6, 10), (15, 7, 10), (15, 8, 10)]
    assert desc[:, 0].tolist() == [1.0, 2.0, 1.0]
    tiles.seek(0)
    assert [tuple(map(int, r)) for r in load_descriptors([tiles])[1]] == [(15, 3, 5), (15, 4, 5)]


GOOD = {"area": {"bbox": [50.4, 30.4, 50.5, 30.6], "zooms": [15]},
        "models": {"global": {"path": "models/global.onnx"}}}


@pytest.mark.parametrize("stride, div", [(1, 1), (1.0, 1), (0.5, 2), (1 / 3, 3), (0.25, 4)])
def test_a_stride_of_1_over_n_tile_parses(tmp_path, stride, div):
    cfg = parse_config(GOOD | {"shards": {"stride": stride}}, tmp_path)
    assert cfg.shards.div == div and ("stride" in cfg.request()["shards"]) == (div > 1)


@pytest.mark.parametrize("stride", [0.3, 0.2, 0, -0.5, 2, float("nan"), "0.5", True])
def test_an_invalid_stride_is_a_config_error_naming_the_key(tmp_path, stride):
    with pytest.raises(ConfigError, match=r"`shards\.stride`"):
        parse_config(GOOD | {"shards": {"stride": stride}}, tmp_path)


def _manifest(index: dict) -> tuple[dict, set[str]]:
    model = {"role": "global", "engine": "e", "sidecar": "s", "backend": "onnxruntime",
             "key": "k", "precision": "fp32", "batch_size": 8,
             "preprocessing": dict.fromkeys(("input_size", "mean", "std", "channel_order",
                                             "resize", "code")),
             "index": {"index": "i", "ids": "d", "factory": "Flat", "metric": "ip",
                       "ef_search": 64} | index}
    runtime = {"area": {"bbox": [0, 0, 1, 1], "zooms": [15], "sector_class": "stable_rear"},
               "tiles": {"block": 16}, "models": {"global": model}}
    return {"runtime": runtime}, {"e", "s", "i", "d"}


def test_the_signed_div_is_read_and_checked():
    assert parse_runtime(*_manifest({})).models["global"].index.div == 1  # before windows
    assert parse_runtime(*_manifest({"div": 2})).models["global"].index.div == 2
    for bad in (0, 5, 2.0, "2", True):
        with pytest.raises(VerifyError, match="div"):
            parse_runtime(*_manifest({"div": bad}))
