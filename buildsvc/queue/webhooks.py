"""Webhooks: POST a finished request's result to the caller's ``?fal_webhook=URL``.

The body follows fal's shape: ``{"request_id", "gateway_request_id", "status": "OK" |
"ERROR", "payload": <the endpoint's JSON or null>, "error": <message, on failure>,
"error_type"}``. A delivery that fails (connection error, timeout or a non-2xx answer) is
retried with exponential backoff (``base_delay * 2**n``, capped) up to ``tries`` times. The
row's ``webhook_state`` is ``pending`` from the moment the result is written, so deliveries
cut short by a restart are sent again on start: at-least-once, like the requests themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from yarl import URL

from buildsvc.queue.store import QueuedRequest, QueueStore

__all__ = ["WebhookSender", "webhook_body"]

_log = logging.getLogger("buildsvc.queue.webhooks")
_TIMEOUT = aiohttp.ClientTimeout(total=30.0, sock_connect=10.0)


def webhook_body(request: QueuedRequest) -> bytes:
    result = request.result
    assert result is not None, "a webhook is sent only for a finished request"
    try:
        payload: Any = json.loads(result.body) if result.body else None
    except ValueError:
        payload = None
    data: dict[str, Any] = {
        "request_id": request.id, "gateway_request_id": request.id,
        "status": "OK" if result.ok else "ERROR", "payload": payload,
    }  # fmt: skip
    if not result.ok:
        data["error"] = result.error or f"request failed with status {result.status}"
        data["error_type"] = result.error_type
    return json.dumps(data).encode()


class WebhookSender:
    """Delivers webhooks in background tasks; see the module docstring."""

    def __init__(
        self,
        store: QueueStore,
        session: Callable[[], aiohttp.ClientSession],
        *,
        tries: int = 10,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        self._store, self._session = store, session
        self._tries, self._base, self._max = tries, base_delay, max_delay
        self._tasks: set[asyncio.Task[None]] = set()

    def resume(self) -> None:
        """Send again every webhook a previous run left pending."""
        for request in self._store.pending_webhooks():
            self.deliver(request)

    def deliver(self, request: QueuedRequest) -> None:
        if request.webhook is None or request.result is None:
            return
        task = asyncio.create_task(self._deliver(request, request.webhook))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop sending; undelivered webhooks stay pending for the next start."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _deliver(self, request: QueuedRequest, url: str) -> None:
        body = webhook_body(request)
        for n in range(self._tries):
            error = await self._post(url, body, request.id)
            if error is None:
                self._store.set_webhook_state(request.id, "delivered")
                return
            _log.warning("webhook for request %s, try %d of %d: %s",
                         request.id, n + 1, self._tries, error)  # fmt: skip
            if n + 1 < self._tries:
                await asyncio.sleep(min(self._max, self._base * 2**n))
        self._store.set_webhook_state(request.id, "failed")

    async def _post(self, url: str, body: bytes, request_id: str) -> str | None:
        """None when delivered, else why not (naming only the URL's origin: its path and
        query often carry a token)."""
        headers = {"content-type": "application/json", "x-fal-request-id": request_id}
        where = str(URL(url).origin())
        try:
            async with self._session().post(
                url, data=body, headers=headers, timeout=_TIMEOUT, allow_redirects=False
            ) as resp:
                await resp.read()
                return None if resp.status < 300 else f"{where} answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{where} unreachable ({type(exc).__name__})"
