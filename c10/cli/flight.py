"""`c10` subcommands of the flight image: pack (the image that is carried to the aircraft)."""
from __future__ import annotations


def register(sub) -> None:
    """No subcommands yet."""
