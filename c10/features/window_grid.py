"""Which retrieval windows a cache has: their ids, the tiles they cover, their row keys."""
from __future__ import annotations

import hashlib
from fractions import Fraction
from typing import NamedTuple, Sequence

import blake3

from c10.store.tiles import Tile

# A camera frame straddles up to four tiles; a window centred between them is a better candidate
# than any of them. With `shards.stride = 1/div`, each global model gets, per zoom, a window at
# every (X, Y) in units of 1/div tile that is not a tile (X or Y not a multiple of div): the
# one-tile square whose top-left corner is (X/div, Y/div) in tile coordinates, cut from the mosaic
# of the 2 or 4 tiles it covers, then preprocessed and embedded exactly as a tile is.
#
# Edges and gaps: a window is made only when every tile it covers is in scope and present. At the
# east and south edge of the area, and beside a missing tile, the windows that would reach past it
# are not made (its tiles are still indexed as tiles). A window belongs to the block of its
# top-left tile: a block's window shard reads the block's tiles and those of the next column and
# row (the edge of its right and lower neighbour blocks).
#
# A window's row is reused as a tile's is (c10.features.descriptor_store), by a key in place of a
# tile's blake3: the blake3 of the cutting code's version, the offset as a reduced fraction of a
# tile and the blake3 of every covered tile in mosaic order. A changed tile changes the keys of
# exactly the windows that cover it; every other row of the shard is taken from its last version.

# Bump when a window is cut differently from the same tiles: every window row is embedded again.
WINDOW_CODE = 1


class Window(NamedTuple):
    """One window: id (z, x, y) in units of 1/div tile, and the tiles it covers, row by row
    (1x2 when only x is off the tile grid, 2x1 when only y is, 2x2 when both are)."""

    z: int
    x: int
    y: int
    tiles: tuple[Tile, ...]

    def __str__(self) -> str:  # how an engine failure names it (c10.features.embedding.inference)
        return f"window {self.z}/{self.x}/{self.y} over {', '.join(t.path for t in self.tiles)}"


def plan_windows(tiles: Sequence[Tile], block: int,
                 div: int) -> dict[tuple[int, int, int], list[Window]]:
    """(z, bx, by) -> the windows whose top-left tile is in that block, in (x, y) order: every
    window at a 1/div-tile offset all of whose tiles are in `tiles` (none for div = 1)."""
    if div <= 1:
        return {}
    present = {(t[0], t[1], t[2]): t for t in tiles}
    offsets = [(ox, oy) for ox in range(div) for oy in range(div) if ox or oy]
    blocks: dict[tuple[int, int, int], list[Window]] = {}
    for tile in tiles:
        z, x, y = tile[0], tile[1], tile[2]
        right, below = present.get((z, x + 1, y)), present.get((z, x, y + 1))
        corner = present.get((z, x + 1, y + 1))
        made = []
        for ox, oy in offsets:
            covered = ((tile, right, below, corner) if ox and oy else (tile, right) if ox
                       else (tile, below))
            if None not in covered:
                made.append(Window(z, x * div + ox, y * div + oy, covered))
        if made:
            blocks.setdefault((z, x // block, y // block), []).extend(made)
    for windows in blocks.values():
        windows.sort(key=lambda w: (w.x, w.y))
    return dict(sorted(blocks.items()))


class WindowBlock(NamedTuple):
    """What the graph knows of a block's windows when it loads: the tiles they cover (a block's
    windows are exactly those of plan_windows over these tiles whose top-left is in the block)."""

    block: tuple[int, int, int]
    tiles: list[Tile]

    def windows(self, size: int, div: int) -> list[Window]:
        return plan_windows(self.tiles, size, div).get(self.block, [])


def window_blocks(tiles: Sequence[Tile], block: int, div: int) -> dict[tuple[int, int, int],
                                                                       WindowBlock]:
    """(z, bx, by) -> the tiles its windows cover, in canonical order, without making the windows:
    the graph computes this on every load, so in numpy (0.3 s in Python at 10^5 tiles). A window
    exists iff its tiles are present, so these tiles decide the block's windows. {} for div = 1."""
    n = len(tiles)
    if div <= 1 or not n:
        return {}
    import numpy as np  # only with windows: every graph load imports this module

    z, x, y = (np.fromiter((t[i] for t in tiles), np.int64, n) for i in range(3))
    key = (z << 50) | (x << 25) | y  # x, y < 2^24 at zoom <= 24
    order = np.argsort(key, kind="stable")
    ordered = key[order]

    def find(wanted: np.ndarray) -> np.ndarray:
        """The index in `tiles` of each wanted key, or -1."""
        pos = np.minimum(np.searchsorted(ordered, wanted), n - 1)
        return np.where(ordered[pos] == wanted, order[pos], -1)

    right, below, corner = find(key + (1 << 25)), find(key + 1), find(key + (1 << 25) + 1)
    has_r, has_b = right >= 0, below >= 0
    has_c = has_r & has_b & (corner >= 0)
    blocks, owner = np.unique((z << 50) | ((x // block) << 25) | (y // block), return_inverse=True)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)  # canonical (z, x, y) rank of each tile
    any_ = has_r | has_b
    members = np.concatenate([np.flatnonzero(any_), right[has_r], below[has_b], corner[has_c]])
    owners = np.concatenate([owner[any_], owner[has_r], owner[has_b], owner[has_c]])
    pairs = np.unique(owners * n + rank[members])  # by block, then canonical; each pair once
    group, picked = pairs // n, order[pairs % n].tolist()
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]).tolist() + [len(pairs)]
    mask, heads = (1 << 25) - 1, blocks[group[starts[:-1]]].tolist()
    out = {}
    for head, lo, hi in zip(heads, starts[:-1], starts[1:]):
        block_id = (head >> 50, (head >> 25) & mask, head & mask)
        out[block_id] = WindowBlock(block_id, [tiles[i] for i in picked[lo:hi]])
    return out


def windows_key(ident: str, div: int, tiles: Sequence[Tile]) -> str:
    """What a window shard is a function of besides its tiles' bytes: the embedding identity, the
    stride, the cutting code and the tiles its windows cover (which decide its windows)."""
    key = hashlib.sha256(f"{ident} {div} {WINDOW_CODE}\n".encode())
    key.update("\n".join([t.path for t in tiles]).encode())
    return key.hexdigest()


def window_key(window: Window, div: int, digests: Sequence[str]) -> str:
    """The row key of a window (in place of a tile's blake3): cutting code, offset as a fraction of
    a tile, and the covered tiles' blake3 in mosaic order."""
    fx, fy = Fraction(window.x % div, div), Fraction(window.y % div, div)
    key = blake3.blake3(f"c10.window/{WINDOW_CODE} {fx.numerator}/{fx.denominator} "
                        f"{fy.numerator}/{fy.denominator}\n".encode())
    for digest in digests:
        key.update(bytes.fromhex(digest))
    return key.hexdigest()
