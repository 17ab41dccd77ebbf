"""Web-Mercator geometry in fractional tile coordinates: lat/lon, ground metres, distances."""
from __future__ import annotations

import math

import mercantile

EARTH_RADIUS_M = 6378137.0  # the WGS 84 semi-major axis Web Mercator is defined on
EQUATOR_M = 2 * math.pi * EARTH_RADIUS_M


def tile_latlon(z: int, x: float, y: float) -> tuple[float, float]:
    """(lat, lon) of the point (x, y) in tile units at zoom z (y counted from the north).

    Tile units are linear in Web-Mercator metres; mercantile projects those (its ul() takes only
    whole tiles in its next major version)."""
    n = 2.0 ** z
    point = mercantile.lnglat(x / n * EQUATOR_M - EQUATOR_M / 2, EQUATOR_M / 2 - y / n * EQUATOR_M)
    return point.lat, point.lng


def latlon_tile(z: int, lat: float, lon: float) -> tuple[float, float]:
    """The inverse of tile_latlon: (x, y) in tile units at zoom z."""
    n = 2.0 ** z
    mx, my = mercantile.xy(lon, lat)
    return (mx + EQUATOR_M / 2) / EQUATOR_M * n, (EQUATOR_M / 2 - my) / EQUATOR_M * n


def tile_size_m(z: int, lat: float) -> float:
    """Ground metres along a tile's side at latitude `lat` (Mercator's scale is 1/cos(lat))."""
    return EQUATOR_M * math.cos(math.radians(lat)) / 2.0 ** z


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle metres between two (lat, lon) points (haversine on the WGS 84 radius)."""
    (lat1, lon1), (lat2, lon2) = ((math.radians(p), math.radians(q)) for p, q in (a, b))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))
