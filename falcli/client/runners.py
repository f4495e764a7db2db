"""Runners: list the service's runner processes, optionally for one app."""

from __future__ import annotations

from typing import Any

from falcli.client._http import Session

# A name of its own: inside the class, `list` is the method.
Records = list[dict[str, Any]]

__all__ = ["Runners"]


class Runners:
    def __init__(self, session: Session) -> None:
        self._s = session

    def list(self, app: str | None = None) -> Records:
        params = {"app": app} if app else None
        return list(self._s.request("GET", "/v1/runners", params=params)["runners"])
