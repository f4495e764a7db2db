"""Plain records the store returns and the rest of the service passes around.

They are the store's interface, not SQLite's: a PostgreSQL store returns the same records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AppRecord", "KeyRecord", "RevisionRecord", "RunnerRecord"]


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    owner: str
    name: str
    admin: bool
    created_at: float
    revoked: bool = False


@dataclass(frozen=True)
class AppRecord:
    owner: str
    name: str
    auth: str  # "private" | "public" | "shared"
    ephemeral: bool
    current_revision: str | None
    scale: dict[str, Any] = field(default_factory=dict)  # live scale settings (options subset)
    created_at: float = 0.0


@dataclass(frozen=True)
class RevisionRecord:
    id: str
    owner: str
    app: str
    bundle_hash: str
    manifest: dict[str, Any]
    env_key: str
    python: str  # path of the environment's interpreter
    workdir: str  # materialised bundle files
    payload: str  # path of the cloudpickle blob
    message: str = ""
    created_at: float = 0.0
    image: str = ""  # the container image its runners run ("": local processes in the env)


@dataclass(frozen=True)
class RunnerRecord:
    id: str
    owner: str
    app: str
    revision: str
    state: str
    pid: int | None
    url: str | None
    started_at: float
    ended_at: float | None = None
