"""c10: builds the signed offline takeoff cache of a GPS-denied UAV."""

__version__ = "0.1.0"
