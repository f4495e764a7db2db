"""The durable queue: submit / status / result / cancel, retries and webhooks.

``open_queue`` assembles the parts (``store`` rows on disk, ``dispatcher`` moving them onto
runners with ``retry`` deciding what to do with each answer, ``webhooks`` announcing results,
``service`` speaking HTTP) into a ``Queue``, whose ``asgi`` serves every path under
``/queue``. Guarantees: at-least-once execution, exactly one terminal result per request id;
see docs/queue.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from buildsvc.fleet import Fleet
from buildsvc.logs import LogHub
from buildsvc.queue.dispatcher import CancelOutcome, Dispatcher, QueueSettings
from buildsvc.queue.service import PREFIX, QueueService
from buildsvc.queue.store import QueuedRequest, QueueStore, Result, RowState, SQLiteQueueStore
from buildsvc.queue.webhooks import WebhookSender

__all__ = [
    "PREFIX",
    "CancelOutcome",
    "Queue",
    "QueueSettings",
    "QueueStore",
    "QueuedRequest",
    "Result",
    "RowState",
    "SQLiteQueueStore",
    "open_queue",
]


@dataclass
class Queue:
    store: QueueStore
    dispatcher: Dispatcher
    asgi: QueueService

    async def close(self) -> None:
        """Stop dispatching (requests in flight are resumed on the next start), then close
        the database. Close the queue before the fleet, so no runner stops under it."""
        await self.dispatcher.close()
        self.store.close()


async def open_queue(
    *,
    data_dir: Path,
    apps: Any,
    keys: Any,
    fleet: Fleet,
    logs: LogHub,
    session: Callable[[], aiohttp.ClientSession],
    settings: QueueSettings | None = None,
    webhook_base_delay: float = 1.0,
    store: QueueStore | None = None,
    rate_check: Callable[[Any, dict[bytes, bytes]], None] | None = None,
) -> Queue:
    """Open ``<data_dir>/queue.db`` (or ``store``), recover interrupted requests, start
    dispatching. ``apps`` is the service's app store (``resolve``), ``keys`` its Keyring,
    ``session`` returns the upstream aiohttp session (the gateway's ``session``),
    ``rate_check`` the gateway's per-key rate limit (``Gateway.check_rate``) for submits.
    The fleet is told the queue's depth per app (its scaler counts the backlog)."""
    settings = settings or QueueSettings()
    rows = store if store is not None else SQLiteQueueStore(Path(data_dir) / "queue.db")
    webhooks = WebhookSender(rows, session, base_delay=webhook_base_delay)
    dispatcher = Dispatcher(store=rows, apps=apps, fleet=fleet, logs=logs, session=session,
                            webhooks=webhooks, settings=settings)  # fmt: skip
    await dispatcher.start()
    asgi = QueueService(store=rows, apps=apps, keys=keys, logs=logs, dispatcher=dispatcher,
                        max_body_bytes=settings.max_body_bytes, max_depth=settings.max_depth,
                        rate_check=rate_check)  # fmt: skip
    fleet.attach_backlog(lambda owner, app: rows.count(owner, app, (RowState.QUEUED,)),
                         dispatcher.wake)  # fmt: skip
    return Queue(rows, dispatcher, asgi)
