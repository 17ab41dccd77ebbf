"""The query side's geometry without a cache: tile coordinates, footprints, the RANSAC similarity,
window features from tiles' keypoints, and frames cut from a mosaic."""
from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from c10.features.embedding import Features
from c10.query import locate
from c10.query.frames import cut_frame, frame_tiles, render
from c10.query.geo import distance_m, latlon_tile, tile_latlon, tile_size_m
from c10.query.rerank import footprint_features, mutual_nearest
from c10.query.search import Searcher, footprint_at
from c10.store.tiles import TileId, center_latlon
from c10.tools import synth

pytestmark = pytest.mark.timeout(60)

Z, X, Y = 16, 38320, 22132


def test_tile_coordinates_round_trip_and_match_tile_centres():
    assert tile_latlon(Z, X + 0.5, Y + 0.5) == pytest.approx(center_latlon(TileId(Z, X, Y)),
                                                             abs=1e-9)
    lat, lon = tile_latlon(Z, X + 0.25, Y + 0.75)
    assert latlon_tile(Z, lat, lon) == pytest.approx((X + 0.25, Y + 0.75), abs=1e-6)
    assert tile_size_m(0, 0.0) == pytest.approx(40075016.686, rel=1e-9)
    # one tile side along a meridian-free row at z16: the ground distance is the tile size
    a, b = tile_latlon(Z, X, Y + 0.5), tile_latlon(Z, X + 1, Y + 0.5)
    assert distance_m(a, b) == pytest.approx(tile_size_m(Z, a[0]), rel=1e-4)


def searcher(ids, div):
    index = faiss.IndexFlatIP(4)
    desc = np.eye(4, dtype=np.float32)[: len(ids)]
    index.add(desc)
    records = np.array([tuple(i) for i in ids], [("z", "<u1"), ("x", "<u4"), ("y", "<u4")])
    return Searcher(None, None, index, records, "ip", div=div), desc


def test_window_rows_carry_their_footprint_and_the_tile_under_its_centre():
    s, desc = searcher([(Z, 2 * X, 2 * Y), (Z, 2 * X + 1, 2 * Y + 1), (Z, 2 * X + 1, 2 * Y)], 2)
    hits = s.search(desc[1:2], 3)[0]
    top = hits[0]
    assert (top.fx, top.fy) == (X + 0.5, Y + 0.5) and (top.z, top.x, top.y) == (Z, X + 1, Y + 1)
    assert (top.lat, top.lon) == pytest.approx(tile_latlon(Z, X + 1, Y + 1))
    assert top.tiles() == [TileId(Z, X, Y), TileId(Z, X + 1, Y), TileId(Z, X, Y + 1),
                           TileId(Z, X + 1, Y + 1)]
    assert top.holds(Z, X + 0.6, Y + 1.4) and not top.holds(Z, X + 0.4, Y + 1.0)
    assert not top.holds(Z - 1, X + 0.6, Y + 1.0)
    s.paths = {TileId(Z, X + i, Y): f"tiles/{Z}/{X + i}/{Y}.jpg" for i in range(2)}
    s.paths[TileId(Z - 1, X, Y)] = "another zoom"
    assert s.listed_tiles() == [TileId(Z, X, Y), TileId(Z, X + 1, Y)]
    tiles, _ = searcher([(Z, X, Y)], 1)
    hit = tiles.search(np.eye(4, dtype=np.float32)[:1], 1)[0][0]
    assert (hit.fx, hit.fy, hit.x, hit.y) == (X, Y, X, Y) and hit.tiles() == [TileId(Z, X, Y)]


@pytest.mark.parametrize("div", [1, 2, 3, 4])
def test_the_footprint_at_a_point_holds_it_and_is_centred_nearest(div):
    rng = np.random.default_rng(div)
    for x, y in X + rng.uniform(0, 3, (200, 2)):
        hit = footprint_at(Z, x, y, div)
        assert hit.holds(Z, x, y)
        assert max(abs(hit.fx + 0.5 - x), abs(hit.fy + 0.5 - y)) <= 0.5 / div + 1e-9
        assert (hit.fx * div).is_integer() and (hit.fy * div).is_integer()
    assert footprint_at(Z, X + 0.5, Y + 0.5, 1, listed=set()) is None


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_a_searcher_refuses_a_bad_div(bad):
    from c10.errors import IndexBuildError

    with pytest.raises(IndexBuildError, match="div"):
        searcher([(Z, X, Y)], bad)


def correspondences(theta_deg, tiles_per_px, centre, n=80, outliers=0.4, seed=0):
    """Frame pixels and tile units related by a similarity, with a share of wrong pairs."""
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 256, (n, 2))
    t = math.radians(theta_deg)
    a = tiles_per_px * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    dst = (src - 128) @ a.T + centre
    bad = rng.random(n) < outliers
    dst[bad] = centre + rng.uniform(-0.5, 0.5, (int(bad.sum()), 2))
    return src, dst, int((~bad).sum())


def test_ransac_similarity_recovers_centre_heading_and_scale():
    centre = np.array([X + 0.3, Y + 0.8])
    src, dst, good = correspondences(12.0, 0.7 / 256, centre)
    fit = locate.fit_similarity(Z, src, dst, np.floor(centre), 256)
    assert fit is not None and abs(fit.inliers - good) <= 3
    pos = locate.position(fit, [fit], (256, 256))
    assert (pos.x, pos.y) == pytest.approx(tuple(centre), abs=1e-4)
    assert pos.heading == pytest.approx(12.0, abs=0.05) and pos.scale == pytest.approx(0.7, 1e-3)
    assert (pos.lat, pos.lon) == pytest.approx(tile_latlon(Z, *centre), abs=1e-6)
    assert pos.m_per_px == pytest.approx(0.7 / 256 * tile_size_m(Z, pos.lat), rel=1e-3)
    assert 0.5 < pos.confidence <= 1
    # an equally strong fit elsewhere leaves no margin
    far = locate.fit_similarity(Z, src, dst + 3, np.floor(centre) + 3, 256)
    assert locate.position(fit, [fit, far], (256, 256)).confidence == 0
    # the same place seen at the zoom above is no rival
    coarse = locate.fit_similarity(Z - 1, src, dst / 2, np.floor(centre / 2), 256)
    assert locate.position(fit, [fit, coarse], (256, 256)).confidence == pos.confidence
    heading = locate.fit_similarity(Z, *correspondences(-8.0, 0.7 / 256, centre)[:2],
                                    np.floor(centre), 256)
    assert locate.position(heading, [heading], (256, 256)).heading == pytest.approx(352, abs=0.05)


def test_too_few_agreeing_pairs_fit_nothing():
    rng = np.random.default_rng(1)
    src, dst = rng.uniform(0, 256, (60, 2)), X + rng.uniform(0, 1, (60, 2))
    assert locate.fit_similarity(Z, src, dst, (X, Y), 256) is None
    assert locate.fit_similarity(Z, src[:5], dst[:5], (X, Y), 256) is None


def feats(kp, value=0.0):
    kp = np.asarray(kp, np.float32)
    return Features(kp, np.full((len(kp), 3), value, np.float32),
                    np.linspace(1, 0.5, len(kp)).astype(np.float32))


def test_window_features_are_the_tiles_keypoints_shifted_inside_first():
    a = feats([[10, 10], [200, 200], [250, 130]], 1.0)     # tile (X, Y)
    b = feats([[5, 100], [100, 100], [200, 240]], 2.0)     # tile (X + 1, Y)
    tiles = {TileId(Z, X, Y): a, TileId(Z, X + 1, Y): b}
    window = footprint_at(Z, X + 1.0, Y + 0.5, 2)          # top-left (X + 0.5, Y)
    assert (window.fx, window.fy) == (X + 0.5, Y)
    out = footprint_features(window, tiles, (256, 256), 4)
    inside = {(200 - 128, 200), (250 - 128, 130), (5 + 128, 100), (100 + 128, 100)}
    assert {tuple(map(float, p)) for p in out.keypoints} == inside
    one = footprint_at(Z, X + 0.5, Y + 0.5, 1)
    assert footprint_features(one, {TileId(Z, X, Y): a}, (256, 256), 3) is a
    short = footprint_features(window, {TileId(Z, X, Y): a}, (256, 256), 4)
    assert len(short.keypoints) == 4  # the matcher's fixed K, even at the area's edge


def test_mutual_nearest_pairs_only_mutual_and_similar_descriptors():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((6, 16)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = Features(np.zeros((6, 2), np.float32), d, np.ones(6, np.float32))
    t = Features(np.zeros((6, 2), np.float32), d[::-1].copy(), np.ones(6, np.float32))
    qi, ti = mutual_nearest(q, t)
    assert list(qi) == list(range(6)) and list(ti) == [5, 4, 3, 2, 1, 0]
    assert len(mutual_nearest(q, t, min_cos=1.01)[0]) == 0


def world(tile: TileId):
    return synth.render_tile(tile.z, tile.x, tile.y, size=128)


def test_a_frame_at_a_tile_centre_unrotated_and_one_tile_wide_is_the_tile():
    frame = render(world, Z, X + 0.5, Y + 0.5, 1.0, 0.0)
    assert np.array_equal(np.asarray(frame), np.asarray(world(TileId(Z, X, Y))))
    # half a tile east: the left half is the tile's right half
    shifted = np.asarray(render(world, Z, X + 1.0, Y + 0.5, 1.0, 0.0))
    assert np.array_equal(shifted[:, :64], np.asarray(world(TileId(Z, X, Y)))[:, 64:])
    assert frame_tiles(Z, X + 1.0, Y + 0.5, 1.0, 0.0) == [TileId(Z, X, Y), TileId(Z, X + 1, Y)]


def test_cut_frames_touch_at_most_four_listed_tiles_and_are_seeded():
    listed = {TileId(Z, X + i, Y + j) for i in range(3) for j in range(3)}
    centre = TileId(Z, X + 1, Y + 1)
    frames = [cut_frame(world, listed, np.random.default_rng(s), centre, 15.0) for s in range(8)]
    for f in frames:
        assert f.tile == centre and f.image.size == (128, 128)
        touched = frame_tiles(f.z, f.x, f.y, f.side, f.heading)
        assert 1 <= len(touched) <= 4 and set(touched) <= listed
        assert min(f.heading, 360 - f.heading) <= 15
    again = cut_frame(world, listed, np.random.default_rng(3), centre, 15.0)
    assert np.array_equal(np.asarray(again.image), np.asarray(frames[3].image))
    # a tile without neighbours: only frames that lie inside it; none where nothing is listed
    alone = cut_frame(world, {TileId(Z, X, Y)}, np.random.default_rng(0), TileId(Z, X, Y))
    assert frame_tiles(alone.z, alone.x, alone.y, alone.side, alone.heading) == [TileId(Z, X, Y)]
    assert cut_frame(world, set(), np.random.default_rng(0), TileId(Z, X, Y)) is None
