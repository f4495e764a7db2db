"""``Client``: one object per service, with a resource per noun."""

from __future__ import annotations

from typing import Any

import httpx

from falcli.client._http import Session
from falcli.client.apps import Apps
from falcli.client.blobs import Blobs
from falcli.client.keys import Keys
from falcli.client.runners import Runners

__all__ = ["Client"]


class Client:
    """The management API of one service (docs/architecture.md, contract 2).

    ``transport`` is the test seam (``httpx.MockTransport``, or a real one with options).
    """

    def __init__(
        self, base_url: str, key: str | None, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._session = Session(base_url, key, transport=transport)
        self.base_url = self._session.base_url
        self.blobs = Blobs(self._session)
        self.apps = Apps(self._session)
        self.runners = Runners(self._session)
        self.keys = Keys(self._session)

    def health(self) -> dict[str, Any]:
        """``{"version": ...}``; needs no key."""
        return dict(self._session.request("GET", "/v1/health"))

    def whoami(self) -> dict[str, Any]:
        """``{"owner", "key_id", "admin"}`` of the key in use."""
        return dict(self._session.request("GET", "/v1/whoami"))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
