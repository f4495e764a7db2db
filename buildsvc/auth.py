"""API keys: create, hash, verify in constant time, and decide who may call an app.

A key is ``<key_id>:<secret>``, sent as ``Authorization: Key <key_id>:<secret>`` (fal's form).
The store holds only HMAC-SHA256(server_secret, secret); the server secret is 32 random bytes
in ``<data_dir>/server.secret`` (0600), so a copied database alone cannot verify guesses.
The admin key made on first start is written to ``<data_dir>/admin.key`` (0600) for the CLI.
No function here logs or puts a secret in an exception message.
"""

from __future__ import annotations

import builtins
import getpass
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from buildsvc.records import AppRecord, KeyRecord
from buildsvc.store import Store

__all__ = [
    "ADMIN_KEY_FILE",
    "AUTH_MODES",
    "RESERVED_OWNERS",
    "SECRET_FILE",
    "Keyring",
    "OwnerError",
    "can_call",
    "check_owner",
    "default_owner",
    "ensure_admin_key",
    "load_server_secret",
]

SECRET_FILE = "server.secret"
ADMIN_KEY_FILE = "admin.key"
AUTH_MODES = ("private", "public", "shared")
RESERVED_OWNERS = frozenset({"v1", "queue", "health"})  # first path segments the service uses
MISSING_KEY = "missing Authorization header: send 'Authorization: Key <key_id>:<secret>'"
INVALID_KEY = "invalid API key"

_OWNER_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


class OwnerError(ValueError):
    """An owner name is malformed or reserved."""


def check_owner(owner: object) -> str:
    """Return ``owner`` if it can be the first segment of an app URL, else raise."""
    if not isinstance(owner, str) or not _OWNER_RE.fullmatch(owner) or len(owner) > 63:
        raise OwnerError(
            f"owner {owner!r}: expected lowercase letters, digits, '-' or '_', starting with a "
            "letter or digit, at most 63 characters, e.g. --owner alice"
        )
    if owner in RESERVED_OWNERS:
        raise OwnerError(
            f"owner {owner!r} is reserved (it is a path the service itself serves); "
            "pick another, e.g. --owner alice"
        )
    return owner


def default_owner() -> str:
    """The local user name made into a valid owner (``Jane.Doe`` -> ``jane-doe``)."""
    try:
        raw = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary uid in a container
        raw = ""
    owner = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")[:63]
    return owner if owner and owner not in RESERVED_OWNERS else "local"


def load_server_secret(data_dir: Path) -> bytes:
    """Read ``server.secret``, creating it (32 random bytes, 0600) on first start."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        _write_private(path, secrets.token_bytes(32))
    secret = path.read_bytes()
    if len(secret) < 32:
        raise ValueError(
            f"{path}: holds {len(secret)} bytes, expected 32; delete it to make a new one "
            "(every existing API key then stops working)"
        )
    return secret


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Keyring:
    """API keys over a ``Store``; verified keys are cached by id, dropped on revoke."""

    def __init__(self, store: Store, secret: bytes) -> None:
        self._store = store
        self._secret = secret
        self._cache: dict[str, tuple[KeyRecord, str]] = {}

    def _hash(self, secret: str) -> str:
        return hmac.new(self._secret, secret.encode(), hashlib.sha256).hexdigest()

    def create(self, owner: str, name: str = "", admin: bool = False) -> tuple[KeyRecord, str]:
        """Make a key for ``owner``; return its record and the full key (shown once)."""
        check_owner(owner)
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = self._store.add_key(key_id, owner, name, self._hash(secret), admin)
        return record, f"{key_id}:{secret}"

    def authenticate(self, authorization: str | None) -> KeyRecord | None:
        """The key an ``Authorization`` header carries, or None if absent or not valid."""
        parsed = _parse_header(authorization)
        if parsed is None:
            return None
        key_id, secret = parsed
        found = self._cache.get(key_id)
        if found is None:
            found = self._store.get_key(key_id)
            if found is None:
                return None
            self._cache[key_id] = found
        record, stored_hash = found
        if not hmac.compare_digest(self._hash(secret), stored_hash):
            return None
        return None if record.revoked else record

    def authorize(self, app: AppRecord, authorization: str | None) -> tuple[bool, int, str]:
        """``can_call`` straight from a header, telling a missing key from a wrong one."""
        key = self.authenticate(authorization)
        return can_call(app, key, presented=bool(authorization))

    def revoke(self, key_id: str) -> bool:
        self._cache.pop(key_id, None)
        revoked = self._store.revoke_key(key_id)
        self._cache.pop(key_id, None)  # a concurrent authenticate may have re-cached it
        return revoked

    def get(self, key_id: str) -> KeyRecord | None:
        found = self._store.get_key(key_id)
        return found[0] if found else None

    def list(self, owner: str | None = None) -> builtins.list[KeyRecord]:
        return self._store.list_keys(owner)


def _parse_header(authorization: str | None) -> tuple[str, str] | None:
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "key":
        return None
    key_id, sep, secret = credentials.strip().partition(":")
    if not sep or not secret or not _KEY_ID_RE.fullmatch(key_id):
        return None
    return key_id, secret


def can_call(
    app: AppRecord, key: KeyRecord | None, *, presented: bool | None = None
) -> tuple[bool, int, str]:
    """May the holder of ``key`` call ``app``? Returns (allowed, status, message).

    public: anyone; shared: any valid key; private: the owner's keys or an admin key.
    ``presented`` says whether the caller sent a header at all (so a wrong key gets "invalid
    API key", not "missing"); when None, a missing key is assumed.
    """
    if app.auth == "public":
        return True, 200, ""
    if key is None:
        return False, 401, INVALID_KEY if presented else MISSING_KEY
    if app.auth == "shared" or key.admin or key.owner == app.owner:
        return True, 200, ""
    return (
        False,
        403,
        f"app {app.owner}/{app.name} is private to owner {app.owner!r}; the key "
        f"{key.key_id} belongs to {key.owner!r}: use a key of {app.owner!r}, or have the owner "
        "redeploy with auth = 'shared'",
    )


def ensure_admin_key(keyring: Keyring, data_dir: Path, owner: str | None = None) -> Path:
    """Make the admin key on first start and write it to ``admin.key`` (0600).

    A later start keeps the file if its key still authenticates; otherwise (deleted file,
    revoked key, new server secret) a fresh admin key replaces it.
    """
    path = data_dir / ADMIN_KEY_FILE
    if path.exists():
        record = keyring.authenticate(f"Key {path.read_text().strip()}")
        if record is not None and record.admin:
            return path
    _, full_key = keyring.create(check_owner(owner or default_owner()), name="admin", admin=True)
    _write_private(path, full_key.encode() + b"\n")
    return path
