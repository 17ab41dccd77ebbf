"""Web-Mercator geometry in fractional tile coordinates: lat/lon, ground metres, distances."""
from __future__ import annotations

import math

# tile coordinates <-> lat/lon live with the tiles (c10.store.tiles); re-exported for the query side
from c10.store.tiles import EARTH_RADIUS_M, EQUATOR_M, latlon_tile, tile_latlon  # noqa: F401


def tile_size_m(z: int, lat: float) -> float:
    """Ground metres along a tile's side at latitude `lat` (Mercator's scale is 1/cos(lat))."""
    return EQUATOR_M * math.cos(math.radians(lat)) / 2.0 ** z


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle metres between two (lat, lon) points (haversine on the WGS 84 radius)."""
    (lat1, lon1), (lat2, lon2) = ((math.radians(p), math.radians(q)) for p, q in (a, b))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))
