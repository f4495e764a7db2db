"""Apps: deploy (streamed NDJSON events), list, get, scale, delete, revisions, logs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from falcli.client._http import Session, iter_ndjson

# A name of its own: inside the class, `list` is the method.
Records = list[dict[str, Any]]

__all__ = ["Apps"]


def _name(name: str) -> str:
    return quote(name, safe="")


class Apps:
    def __init__(self, session: Session) -> None:
        self._s = session

    def deploy(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST the deploy request; yield its events (log, stage, then done or error)."""
        with self._s.stream("POST", "/v1/apps/deploy", json_body=request) as resp:
            yield from iter_ndjson(resp)

    def list(self) -> Records:
        return list(self._s.request("GET", "/v1/apps")["apps"])

    def get(self, name: str) -> dict[str, Any]:
        return dict(self._s.request("GET", f"/v1/apps/{_name(name)}"))

    def scale(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Change a live app's scale settings (only the keys given); return the app."""
        return dict(self._s.request("PATCH", f"/v1/apps/{_name(name)}/scale", json_body=settings))

    def delete(self, name: str) -> None:
        self._s.request("DELETE", f"/v1/apps/{_name(name)}")

    def revisions(self, name: str) -> Records:
        body = self._s.request("GET", f"/v1/apps/{_name(name)}/revisions")
        return list(body["revisions"])

    def logs(self, name: str, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        """The app's log records; with ``follow`` the stream stays open for new ones."""
        params = {"follow": "1"} if follow else None
        with self._s.stream("GET", f"/v1/apps/{_name(name)}/logs", params=params) as resp:
            yield from iter_ndjson(resp)
