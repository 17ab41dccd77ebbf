"""Where c10 keeps the state of this host, outside every cache (the XDG base directories)."""
from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """$XDG_CONFIG_HOME/c10 (default ~/.config/c10): the trust store of operator keys."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "c10"


def state_dir() -> Path:
    """$XDG_STATE_HOME/c10 (default ~/.local/state/c10): verifier state, ledgers, demo keys."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "c10"


def trust_store_dir() -> Path:
    return config_dir() / "trusted"


def cache_tag(root: Path) -> str:
    """A short name for a cache on this host (its resolved path, hashed)."""
    import hashlib

    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]


def cache_secret(root: Path, create: bool = False) -> bytes | None:
    """32 random bytes this host keeps for one cache (0600, outside it): what authenticates the
    hints c10 leaves in the cache (the tile-scan memo). None if there is none and not `create`."""
    path = state_dir() / "secrets" / f"{cache_tag(root)}.key"
    try:
        data = path.read_bytes()
        if len(data) == 32:
            return data
    except OSError:
        pass
    if not create:
        return None
    from c10.store import atomic

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic.write_bytes(path, os.urandom(32), mode=0o600)
    return path.read_bytes()
