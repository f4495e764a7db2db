"""Keyring and can_call: hashes at rest, constant-time checks, revocation, file modes."""

from __future__ import annotations

import hmac
import stat
from pathlib import Path

import pytest

from buildsvc import auth
from buildsvc.auth import (
    INVALID_KEY,
    MISSING_KEY,
    Keyring,
    OwnerError,
    can_call,
    check_owner,
    default_owner,
    ensure_admin_key,
    load_server_secret,
)
from buildsvc.records import AppRecord, KeyRecord
from buildsvc.store import SQLiteStore


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    store = SQLiteStore(tmp_path / "service.db")
    yield Keyring(store, load_server_secret(tmp_path))
    store.close()


def test_secret_is_stored_only_as_hmac(keyring: Keyring, tmp_path: Path) -> None:
    record, full_key = keyring.create("alice", "laptop")
    secret = full_key.split(":", 1)[1]
    assert full_key.startswith(record.key_id + ":")
    for db_file in tmp_path.glob("service.db*"):  # the db and its WAL
        assert secret.encode() not in db_file.read_bytes()
    assert keyring.authenticate(f"Key {full_key}") == record


def test_server_secret_and_admin_key_are_0600(keyring: Keyring, tmp_path: Path) -> None:
    path = ensure_admin_key(keyring, tmp_path, "root")
    for f in (tmp_path / "server.secret", path):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    admin = keyring.authenticate(f"Key {path.read_text().strip()}")
    assert admin is not None and admin.admin and admin.owner == "root"
    assert ensure_admin_key(keyring, tmp_path, "root") == path  # second start keeps it
    assert len(keyring.list()) == 1


def test_compare_is_constant_time(keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    _, full_key = keyring.create("alice")
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert keyring.authenticate(f"Key {full_key}x") is None
    assert keyring.authenticate(f"Key {full_key}") is not None
    assert len(calls) == 2


@pytest.mark.parametrize(
    "header", [None, "", "Bearer abc", "Key nocolon", "Key 0123456789abcdef:", "Key zz:secret"]
)
def test_malformed_headers_are_refused(keyring: Keyring, header: str | None) -> None:
    assert keyring.authenticate(header) is None


def test_revoked_key_is_refused_even_when_cached(keyring: Keyring) -> None:
    record, full_key = keyring.create("alice")
    assert keyring.authenticate(f"Key {full_key}") is not None  # now cached
    assert keyring.revoke(record.key_id) is True
    assert keyring.authenticate(f"Key {full_key}") is None


def test_a_new_server_secret_invalidates_keys(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    _, full_key = Keyring(store, b"a" * 32).create("alice")
    assert Keyring(store, b"b" * 32).authenticate(f"Key {full_key}") is None
    store.close()


def _key(owner: str, admin: bool = False) -> KeyRecord:
    return KeyRecord("0123456789abcdef", owner, "", admin, 0.0)


@pytest.mark.parametrize(
    ("auth_mode", "key", "presented", "expected"),
    [
        ("public", None, False, (True, 200)),
        ("public", None, True, (True, 200)),
        ("shared", None, False, (False, 401)),
        ("shared", _key("bob"), True, (True, 200)),
        ("private", _key("alice"), True, (True, 200)),
        ("private", _key("bob", admin=True), True, (True, 200)),
        ("private", _key("bob"), True, (False, 403)),
        ("private", None, True, (False, 401)),
    ],
)
def test_can_call(auth_mode: str, key: KeyRecord | None, presented: bool, expected: tuple) -> None:
    app = AppRecord("alice", "echo", auth_mode, False, None)
    allowed, status, message = can_call(app, key, presented=presented)
    assert (allowed, status) == expected
    if status == 403:
        assert "alice/echo" in message and "'bob'" in message
    if status == 401:
        assert message == (INVALID_KEY if presented else MISSING_KEY)


def test_authorize_tells_missing_from_invalid(keyring: Keyring) -> None:
    app = AppRecord("alice", "echo", "private", False, None)
    assert keyring.authorize(app, None) == (False, 401, MISSING_KEY)
    assert keyring.authorize(app, "Key 0123456789abcdef:nope") == (False, 401, INVALID_KEY)


@pytest.mark.parametrize("owner", ["v1", "queue", "health", "Alice", "-x", "", "a/b"])
def test_bad_owners_are_refused(owner: str) -> None:
    with pytest.raises(OwnerError, match=repr(owner)):
        check_owner(owner)


def test_default_owner_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth.getpass, "getuser", lambda: "Jane.Doe")
    assert default_owner() == "jane-doe"
    monkeypatch.setattr(auth.getpass, "getuser", lambda: "queue")
    assert check_owner(default_owner()) == "local"
