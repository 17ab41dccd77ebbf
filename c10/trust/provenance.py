"""What a ground build may carry forward: what the last signed Manifest lists, or it wrote."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from c10.canonical import canonical_json
from c10.errors import ManifestWriteError, VerifyError
from c10.store import atomic
from c10.store.digest import blake3_file
from c10.store.host import cache_tag, state_dir
from c10.store.layout import ENGINE_NAME, ENGINES_DIR, REFS_DIR, ref_relpath, split_tagged
from c10.store.refs import read_ref
from c10.trust.files import read_regular
from c10.trust.strictjson import StrictJSONError, strict_loads

if TYPE_CHECKING:
    import numpy as np


class Ledger:
    """The derived files builds on this host wrote into one cache (path -> blake3), kept outside
    the cache, where an attacker of the cache cannot write: what a later build of this host may
    carry forward though no Manifest signed it yet (a build stopped before its commit, engines
    compiled on their own, a new signing key)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.path = state_dir() / "ledgers" / f"{cache_tag(self.root)}.json"
        self._files: dict[str, str] | None = None
        self._dirty, self._saved = False, 0.0
        # `doit -n N`: a shard thread records while another saves (a record made between the copy
        # and its write would be lost, and the file then refused as not written by this build)
        self._lock = threading.RLock()

    @property
    def files(self) -> dict[str, str]:
        if self._files is None:
            with self._lock:
                if self._files is None:
                    self._files = self._load()
        return self._files

    def _load(self) -> dict[str, str]:
        try:
            data = strict_loads(self.path.read_bytes(), max_depth=3)
        except (OSError, StrictJSONError):
            return {}  # none yet, or unreadable: files are then trusted only if signed
        ok = isinstance(data, dict) and data.get("root") == str(self.root)
        files = data.get("files") if ok else None
        return {k: v for k, v in files.items() if isinstance(v, str)} if isinstance(files, dict) \
            else {}

    def record(self, rel: str, digest: str) -> None:
        with self._lock:
            self.files[rel] = digest
            self._dirty = True

    def save(self, min_interval: float = 0.0, prune: bool = False) -> None:
        """Write the ledger (not again within `min_interval` seconds: a kill loses at most that
        much, which only costs a rebuild); prune: without entries of files the cache no longer
        holds (the coverage gate's, once every writer of the build has finished)."""
        with self._lock:
            if not (self._dirty or prune) or time.monotonic() - self._saved < min_interval:
                return
            kept = {rel: d for rel, d in self.files.items()
                    if not prune or (self.root / rel).is_file()}
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic.write_bytes(self.path, canonical_json({"root": str(self.root), "files": kept}),
                               mode=0o600)
            self._files, self._dirty, self._saved = kept, False, time.monotonic()


class Provenance:
    """The trust of one build in the derived files under its cache.

    Refs, the hash cache, doit's DB and the scan memo are hints: they may make a build redo work,
    never bring bytes into a Manifest that no signature or computation of c10 vouches for. A
    derived file is trusted when a build on this host wrote it (the ledger), or when the last
    Manifest, verified against the operator's key (or a key of this host's trust store), lists
    it with these very bytes."""

    def __init__(self, root: Path, trusted_keys: dict, ledger: Ledger | None = None):
        self.root = Path(root)
        self._keys = trusted_keys
        self._signed: dict[str, str] | None = None
        self._manifest: dict | None = None
        self._by_logical: dict[str, tuple[str, str]] | None = None
        self.unsigned_reason: str | None = None
        self.ledger = ledger or Ledger(root)
        self.list_keys: dict = {}  # list blake3 -> keys, as signed_tile_keys took them

    @property
    def signed(self) -> dict[str, str]:
        """path -> blake3 of every file the root of the last verified Manifest lists: the derived
        files, and in a tree the tile lists, not the tiles they list ({} if none verifies)."""
        if self._signed is None:
            manifest = self.verified
            self._signed = {} if manifest is None else {
                f["path"]: f["blake3"] for f in manifest["files"]}
        return self._signed

    def signed_tile_keys(self) -> "np.ndarray":
        """The first 8 bytes of the blake3 of every tile the last verified Manifest lists, as
        sorted little-endian uint64: the descriptor store's hint of which rows the committed
        shards may hold, never a trust decision (a wrong key costs a computation or a scan). A
        list's keys come from LIST_KEYS when it holds the list's blake3 (the commit that signed
        it wrote them), else from the list, read and checked against its root entry."""
        import numpy as np

        from c10.store.listkeys import read_list_keys, row_keys
        from c10.trust.tilelists import signed_lists

        manifest = self.verified
        if manifest is None:
            return np.zeros(0, "<u8")
        flat = bytes.fromhex("".join(f["blake3"][:16] for f in manifest["files"]
                                     if f["kind"] == "tile"))
        known = read_list_keys(self.root)
        for entry, data in signed_lists(self.root, manifest, skip=known):
            known[entry["blake3"]] = row_keys(data)
        self.list_keys = {f["blake3"]: known[f["blake3"]] for f in manifest["files"]
                          if f["blake3"] in known}
        return np.sort(np.concatenate([np.frombuffer(flat, "<u8"), *self.list_keys.values()]))

    @property
    def verified(self) -> dict | None:
        """The last Manifest, parsed, if it verifies (signature, payload == Manifest.json) against
        these keys; None otherwise. Its tile lists are not read."""
        if self._manifest is None and self.unsigned_reason is None:
            from c10.trust.verify import verify_signed_manifest

            try:
                self._manifest = verify_signed_manifest(self.root, trusted=self._keys, now=None)
            except VerifyError as exc:
                self.unsigned_reason = exc.reason
        return self._manifest

    def record(self, rel: str, digest: str) -> None:
        """This build wrote `rel` with these bytes (kept in the host's ledger: `save`)."""
        self.ledger.record(rel, digest)

    def save(self, min_interval: float = 0.0, prune: bool = False) -> None:
        self.ledger.save(min_interval, prune)

    def trusts(self, rel: str, digest: str) -> bool:
        return self.ledger.files.get(rel) == digest or self.signed.get(rel) == digest

    def read(self, rel: str, digest: str, limit: int = 1 << 34) -> bytes | None:
        """The bytes of `rel` if they hash to `digest` and are trusted, else None; read once."""
        if not self.trusts(rel, digest):
            return None
        try:
            data = read_regular(self.root / rel, limit)
        except OSError:
            return None
        return data if data is not None and blake3.blake3(data).hexdigest() == digest else None

    def previous(self, logical: str) -> bytes | None:
        """The signed bytes of `logical` (a shard or index file) to carry rows forward from, or
        None: only what the last verified Manifest lists, never what a ref names."""
        if self._by_logical is None:  # once: a build asks for thousands of shards
            self._by_logical = {}
            for rel, digest in self.signed.items():
                split = split_tagged(rel)
                if split is not None:
                    self._by_logical[split[0]] = (rel, digest)
        found = self._by_logical.get(logical)
        return self.read(*found) if found else None

    def current(self, logical: str) -> tuple[dict, bytes]:
        """(entry, bytes) of the file the build's ref names for `logical`, which must be trusted;
        ManifestWriteError naming it otherwise, after dropping the ref so the next build
        rebuilds the file."""
        entry = read_ref(self.root, logical)
        data = self.read(entry["path"], entry["blake3"]) if entry else None
        if data is None:
            self.queue_untrusted()
            what = entry["path"] if entry else ref_relpath(logical)
            raise ManifestWriteError(self.untrusted(what))
        return entry, data

    def queue_untrusted(self) -> None:
        """Remove every ref and engine sidecar naming bytes c10 cannot vouch for, so that the
        next build rebuilds all of them at once (not one per failed run). Only c10's own files
        go: a ref, or the sidecar of an engine (the engine then recompiles)."""
        top = self.root / REFS_DIR
        for ref in sorted(top.rglob("*.json")) if top.is_dir() else ():
            logical = ref.relative_to(top).as_posix().removesuffix(".json")
            entry = read_ref(self.root, logical)
            if entry is None or not self.trusts(entry["path"], entry["blake3"]):
                ref.unlink(missing_ok=True)
        engines = self.root / ENGINES_DIR
        for sidecar in sorted(engines.glob("*.json")) if engines.is_dir() else ():
            pair = [p for p in engines.glob(sidecar.stem + ".*") if ENGINE_NAME.match(p.name)]
            if not all(self._file_trusted(p) for p in pair):
                sidecar.unlink(missing_ok=True)

    def _file_trusted(self, path: Path) -> bool:
        try:
            return self.trusts(path.relative_to(self.root).as_posix(), blake3_file(path))
        except OSError:
            return False

    def untrusted(self, rel: str) -> str:
        if self.unsigned_reason:
            why = (f"the last Manifest does not verify ({self.unsigned_reason}) against the "
                   "signing key or the trust store (a new signing key? then put the previous "
                   "key's .pub into ~/.config/c10/trusted/ to carry its files forward)")
        else:
            why = ("the last signed Manifest does not list these bytes (an edited ref, doit DB, "
                   "hash cache or file, or a build stopped before its commit)")
        return (f"{self.root}: {rel} was not written by this build and {why}; every such file "
                "was queued for a rebuild and nothing was signed")
