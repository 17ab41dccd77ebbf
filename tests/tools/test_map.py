"""`c10 map`: one panel per zoom; present, missing and last-run tiles drawn in different colours."""
from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from c10.cli import main as c10_main
from c10.rules.driver import run_build
from c10.tools.tilemap import (
    COLORS,
    LINE,
    MARGIN,
    MISSING,
    PRESENT,
    REBUILT,
    RIGHT,
    _grid,
    render_map,
)


def tile_xy(path) -> tuple[int, int]:
    return int(path.parent.name), int(path.stem)


def test_map_of_a_built_cache(cache, capsys, tmp_path):
    tiles = sorted((cache / "tiles/15").rglob("*.jpg"))
    back, gone, kept = tiles[14], tiles[9], tiles[27]  # interior tiles, away from the bbox outline
    shutil.move(back, tmp_path / "back.jpg")
    assert run_build(cache) == 0
    shutil.move(tmp_path / "back.jpg", back)
    assert run_build(cache) == 0  # `back` is the one tile re-embedded by this build
    shutil.move(gone, tmp_path / "gone.jpg")
    capsys.readouterr()

    out = tmp_path / "map.png"
    assert c10_main(["map", str(cache), "-o", str(out)]) == 0
    assert "1 rebuilt in the last build" in capsys.readouterr().out
    image = Image.open(out).convert("RGB")
    panel = render_map(cache).panels[15]
    assert image.size == (max(panel.size[0] + RIGHT, 560) + 2 * MARGIN,
                          MARGIN + 5 * LINE + panel.size[1] + 3 * LINE + MARGIN)
    assert panel.size == (panel.nx * panel.cell, panel.ny * panel.cell) and panel.cell >= 8
    colours = {name: image.getpixel(panel.cell_center(*tile_xy(t)))
               for name, t in (("present", kept), ("missing", gone), ("rebuilt", back))}
    assert colours == {"present": COLORS[PRESENT], "missing": COLORS[MISSING],
                       "rebuilt": COLORS[REBUILT]}
    assert panel.counts == {PRESENT: len(tiles) - 2, REBUILT: 1, MISSING: 1}


def test_map_before_any_build_has_no_rebuilt_tiles(cache, tmp_path):
    result = render_map(cache)
    assert result.panels[15].counts[REBUILT] == 0 and result.panels[15].counts[MISSING] == 0


def test_large_area_is_drawn_a_pixel_per_block_with_missing_winning():
    z, ranges = 18, (1000, 2999, 5000, 5009)   # 2000 x 10 tiles: 5 tiles per pixel
    present = {(z, x, y) for x in range(1000, 3000) for y in range(5000, 5010)} - {(z, 1002, 5003)}
    panel, cells = _grid(z, ranges, present, rebuilt={(z, 2000, 5000)})
    assert (panel.k, panel.cell, cells.shape) == (5, 1, (2, 400))
    assert cells[0, 0] == MISSING and cells[1, 0] == PRESENT and cells[0, 200] == REBUILT
    assert np.count_nonzero(cells == MISSING) == 1
    assert panel.counts == {PRESENT: 19998, REBUILT: 1, MISSING: 1}
