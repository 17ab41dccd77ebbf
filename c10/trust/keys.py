"""Operator Ed25519 keys: create, load safely (opened once, zeroed), identify, trust."""
from __future__ import annotations

import base64
import contextlib
import errno
import getpass
import hashlib
import os
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from c10.errors import ManifestWriteError, SigningKeyError, TrustedKeyError
from c10.store.atomic import fsync_dir
from c10.store.layout import CONFIG_NAME

_MAX_KEY_BYTES = 64 * 1024  # a PEM Ed25519 key is < 1 KiB; anything bigger is not a key


# ---------------------------------------------------------------- identity

def _public(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    """Accept a private or public key wherever only the public half matters."""
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else key


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public half."""
    return _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid(public_key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Hex sha256 of the raw 32-byte public key: the id in envelopes and allowlists."""
    return hashlib.sha256(raw_public(public_key)).hexdigest()


def ssh_fingerprint(public_key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """`SHA256:...` exactly as `ssh-keygen -lf` prints it, for operators to compare by eye."""
    blob = b"".join(struct.pack(">I", len(part)) + part for part in (b"ssh-ed25519",
                                                                     raw_public(public_key)))
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of the public half (what goes into --trusted-keys files)."""
    return _public(key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------- key files

def generate_key(path: Path, passphrase: bytes | None = None) -> str:
    """Write a new Ed25519 PKCS8 PEM key at `path` (0600 from creation); return its keyid."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            encryption)
    _create_exclusive(path, pem)
    return keyid(key)


def _create_exclusive(path: Path, data: bytes) -> None:
    """Publish `data` at `path` only if nothing is there, never partially, never beyond 0600.

    atomic.write_bytes would os.replace an existing key (losing it), so this keeps its
    temp-fsync-publish-fsync shape but publishes with os.link, which fails if `path` exists.
    mkstemp creates the temp file 0600 whatever the umask, so no instant is world-readable.
    """
    if not path.parent.is_dir():
        raise SigningKeyError(f"cannot create key {path}: directory {path.parent} does not exist; "
                              f"run `mkdir -p {path.parent}` then `c10 keygen {path}`")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _link_new(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def _link_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise SigningKeyError(f"refusing to overwrite existing file {path}: keep that key, or "
                              f"choose another path: `c10 keygen NEW_PATH`") from None
    except OSError as exc:
        raise SigningKeyError(f"cannot create key {path}: {exc.strerror} (the filesystem must "
                              f"support hard links and POSIX modes); use a local disk path with "
                              f"`c10 keygen PATH`") from None


def load_signing_key(
    path: Path, *, passphrase: bytes | Callable[[], bytes | None] | None, cache_root: Path | None
) -> Ed25519PrivateKey:
    """Load the operator key after refusing unsafe files; the file is opened exactly once.

    Seed CP-INV-7: one open, the PEM bytes are zeroed after parsing, and nothing is cached;
    the caller drops the returned key once it has signed. `passphrase` may be a callable
    (a prompt), asked only when the PEM turns out to be encrypted.
    """
    path = Path(path)
    _refuse_inside_cache(path, cache_root)
    buf = _read_key_file_once(path)
    try:
        if callable(passphrase):
            passphrase = passphrase() if b"ENCRYPTED" in buf[:64] else None
        return _parse_private_key(buf, passphrase, path)
    finally:
        buf[:] = bytes(len(buf))  # zero the PEM (and any unencrypted key) in place


def _refuse_inside_cache(path: Path, cache_root: Path | None) -> None:
    """The cache is copied to aircraft and USB sticks; the private key must never ride along."""
    if cache_root is None:
        return
    key, root = path.resolve(), Path(cache_root).resolve()
    if key == root or root in key.parents:
        raise SigningKeyError(f"refusing key {path}: it lies inside the cache {cache_root}, which "
                              f"is shipped; move it out (`mv {path} ~/.c10/`) and update "
                              f"signing.key in c10.toml")


def _read_key_file_once(path: Path) -> bytearray:
    """One os.open; O_NOFOLLOW refuses a symlink and fstat checks the very file we read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        _check_key_stat(path, os.fstat(fd))
        return _read_all(fd, path)
    finally:
        os.close(fd)


def _open_error(path: Path, exc: OSError) -> SigningKeyError:
    if exc.errno == errno.ELOOP:
        return SigningKeyError(f"refusing key {path}: it is a symlink; point signing.key "
                               f"at the real file (`readlink -f {path}`)")
    if exc.errno == errno.ENOENT:
        return SigningKeyError(f"signing key {path} does not exist; create one with "
                               f"`c10 keygen {path}` or fix signing.key in c10.toml")
    return SigningKeyError(f"cannot read signing key {path}: {exc.strerror}; check its owner "
                           f"and permissions (`ls -l {path}`)")


def _check_key_stat(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SigningKeyError(f"refusing key {path}: not a regular file; point "
                              f"signing.key at a PEM file made by `c10 keygen PATH`")
    if st.st_mode & 0o077:
        raise SigningKeyError(f"refusing key {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                              f"other users read it; run `chmod 600 {path}`")
    if st.st_size > _MAX_KEY_BYTES:
        raise SigningKeyError(f"refusing key {path}: {st.st_size} bytes is too big for an "
                              f"Ed25519 PEM key; create one with `c10 keygen PATH`")


def _read_all(fd: int, path: Path) -> bytearray:
    """Read into one growing bytearray so the caller can zero every copy we made."""
    buf = bytearray(_MAX_KEY_BYTES + 1)
    view, n = memoryview(buf), 0
    while n < len(buf):
        got = os.readv(fd, [view[n:]])
        if got == 0:
            break
        n += got
    view.release()
    data = buf[:n]
    buf[:] = bytes(len(buf))
    return data


def _parse_private_key(buf: bytearray, passphrase: bytes | None, path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(buf, passphrase or None)
    except TypeError as exc:  # cryptography signals a missing/unexpected password with TypeError
        raise _passphrase_error(path, encrypted="not given" in str(exc)) from None
    except ValueError as exc:
        raise _parse_error(path, exc) from None
    except UnsupportedAlgorithm:
        raise SigningKeyError(f"signing key {path} uses an unsupported algorithm; c10 signs "
                              f"with Ed25519: create a key with `c10 keygen NEW_PATH`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path} is a {type(key).__name__}, not Ed25519; "
                              f"create an Ed25519 key with `c10 keygen NEW_PATH`")
    return key


def _passphrase_error(path: Path, *, encrypted: bool) -> SigningKeyError:
    if encrypted:
        return SigningKeyError(f"signing key {path} is encrypted and no passphrase was given; "
                               "give it through signing.passphrase_file in c10.toml or "
                               f"$C10_KEY_PASSPHRASE_FILE, or at the prompt on a terminal")
    return SigningKeyError(f"signing key {path} is not encrypted but a passphrase was given; "
                           "remove signing.passphrase_file from c10.toml (and unset "
                           "$C10_KEY_PASSPHRASE_FILE)")


def _parse_error(path: Path, exc: ValueError) -> SigningKeyError:
    if "password" in str(exc).lower() or "decrypt" in str(exc).lower():
        return SigningKeyError(f"wrong passphrase for signing key {path}; retry with the right "
                               "one (signing.passphrase_file, $C10_KEY_PASSPHRASE_FILE or the "
                               "prompt)")
    return SigningKeyError(f"signing key {path} is not a valid PEM private key; create one "
                           f"with `c10 keygen NEW_PATH`")


def trust_store_keys() -> dict[str, Ed25519PublicKey]:
    """The keys of the trust store ({} when it is empty or absent; an unreadable one is skipped:
    this serves a build's carry-forward, where a missing key only costs a rebuild)."""
    from c10.store.host import trust_store_dir

    store = trust_store_dir()
    out = {}
    for path in sorted(store.glob("*")) if store.is_dir() else ():
        try:
            out.update(load_trusted_keys([path]))
        except TrustedKeyError:
            continue
    return out


def load_trusted_keys(entries: Iterable[str | os.PathLike]) -> dict[str, Ed25519PublicKey]:
    """Trusted verifier keys from PEM/OpenSSH public key files or 64-hex raw public keys.

    A 64-hex entry is the raw public key itself, NOT a keyid (both are 64 hex digits).
    """
    trusted: dict[str, Ed25519PublicKey] = {}
    for entry in entries:
        key = _load_trusted(entry)
        trusted[keyid(key)] = key
    return trusted


def _load_trusted(entry: str | os.PathLike) -> Ed25519PublicKey:
    text = os.fspath(entry).strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    try:
        data = Path(text).read_bytes()
    except OSError as exc:
        raise TrustedKeyError(f"cannot read trusted key {text}: {exc.strerror}; pass a public "
                              f"key file (`c10 keygen` prints one) or 64-hex raw key") from None
    return _parse_public(data, text)


def _parse_public(data: bytes, where: str) -> Ed25519PublicKey:
    try:
        if data.lstrip().startswith(b"ssh-ed25519"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise TrustedKeyError(f"trusted key {where} is not an Ed25519 public key (PEM or "
                              f"ssh-ed25519); use the PATH.pub that `c10 keygen PATH` writes")
    return key




# ---------------------------------------------------------------- the operator's key for a build

def load_operator_key(signing, cache_root: Path) -> Ed25519PrivateKey:
    """c10.toml's [signing] key, loaded and checked against signing.allowed_keyids before any
    file is written (seed CP-TC-7, CP-INV-7)."""
    where = Path(cache_root) / CONFIG_NAME
    if signing.key is None:
        raise SigningKeyError(f"{where}: `signing.key` is not set; create a key outside the cache "
                              "with `c10 keygen ~/.config/c10/operator.pem` and set its path")
    key = load_signing_key(signing.key, passphrase=_passphrase(signing), cache_root=cache_root)
    check_key_allowed(key, list(signing.allowed_keyids) or None)
    return key


def _passphrase(signing):
    """From signing.passphrase_file, $C10_KEY_PASSPHRASE_FILE, or a prompt on a terminal; never
    argv."""
    source = signing.passphrase_file or os.environ.get("C10_KEY_PASSPHRASE_FILE")
    if source:
        try:
            return Path(source).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise SigningKeyError(f"{source}: cannot read the key passphrase file "
                                  f"({exc.strerror})") from None
    if sys.stdin.isatty():  # asked only if the key turns out to be encrypted
        return lambda: getpass.getpass(f"passphrase for {signing.key}: ").encode()
    return None


def check_key_allowed(key, allowed_keyids: list[str] | None) -> None:
    """Seed CP-TC-7: refuse a key outside a non-empty allowlist; call before writing anything.

    Entries may be keyids (hex sha256 of the raw key) or `SHA256:` SSH fingerprints.
    """
    if not allowed_keyids:
        return
    kid, fpr = keyid(key), ssh_fingerprint(key)
    allowed = {a.strip() for a in allowed_keyids}
    if kid in {a.lower() for a in allowed} or fpr in allowed:
        return
    # What is true on every path: the API refuses before it writes anything, `doit build_cache`
    # only after doit has recorded its run under .c10/ (its DB, the report, the lock holder)
    raise ManifestWriteError(f"signing key {kid} ({fpr}) is not in signing.allowed_keyids of "
                             "c10.toml: nothing was signed and the Manifest in force is unchanged",
                             f"sign with an allowed key (signing.key) or add \"{kid}\" to "
                             "signing.allowed_keyids")
