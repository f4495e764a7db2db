"""Keys: create (the secret is returned once), list, revoke."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from falcli.client._http import Session

# A name of its own: inside the class, `list` is the method.
Records = list[dict[str, Any]]

__all__ = ["Keys"]


class Keys:
    def __init__(self, session: Session) -> None:
        self._s = session

    def create(
        self, *, owner: str | None = None, name: str | None = None, admin: bool = False
    ) -> dict[str, Any]:
        """A new key: ``{"key_id", "key": "<id>:<secret>", "owner"}``."""
        body: dict[str, Any] = {"admin": admin}
        if owner:
            body["owner"] = owner
        if name:
            body["name"] = name
        return dict(self._s.request("POST", "/v1/keys", json_body=body))

    def list(self) -> Records:
        return list(self._s.request("GET", "/v1/keys")["keys"])

    def revoke(self, key_id: str) -> None:
        self._s.request("DELETE", f"/v1/keys/{quote(key_id, safe='')}")
