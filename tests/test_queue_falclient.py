"""The unmodified fal-client (PyPI 1.0.3) against the queue, over TLS with a self-signed
certificate: submit, status with logs, result, cancel, subscribe, and the URLs it rebuilds
itself from the request id (``fal_client.status/result/cancel``).

fal-client reads ``FAL_QUEUE_RUN_HOST`` / ``FAL_RUN_HOST`` at import time and always speaks
https, so it runs in a child process with those set, ``SSL_CERT_FILE`` trusting our cert and
``FAL_KEY`` holding a key of the app's owner (the app is private).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from queue_helpers import OWNER, QStack, queue_stack, self_signed

pytestmark = pytest.mark.slow

_CLIENT = """
import json, time, fal_client
from fal_client.client import FalClientHTTPError, Completed, InProgress, Queued

app = "alice/echo"
out = {}
handle = fal_client.submit(app, arguments={"text": "hi"}, path="/log")
out["request_id"] = handle.request_id
seen = [type(e).__name__ for e in handle.iter_events(with_logs=True, interval=0.02)]
out["seen"] = seen
out["result"] = handle.get()
deadline = time.monotonic() + 10  # runner output may be read just after the result
while True:
    final = handle.status(with_logs=True)
    out["logs"] = [entry["message"] for entry in final.logs]
    if any(m.startswith("endpoint log") for m in out["logs"]) or time.monotonic() > deadline:
        break
    time.sleep(0.05)
again = fal_client.status(app, handle.request_id, with_logs=False)
out["rebuilt_status"] = type(again).__name__
out["rebuilt_result"] = fal_client.result(app, handle.request_id)["path"]

hang = fal_client.submit(app, arguments={}, path="/hang")
while not isinstance(hang.status(), InProgress):
    pass
queued = fal_client.submit(app, arguments={}, path="/echo", priority="low")
out["queued"] = type(queued.status()).__name__
fal_client.cancel(app, queued.request_id)
hang.cancel()
try:
    hang.get()
except FalClientHTTPError as exc:
    out["cancelled"] = [exc.status_code, exc.error_type]
out["cancel_status"] = hang.status().error_type
done = fal_client.subscribe(app, arguments={"n": 1}, path="/echo", with_logs=True)
out["subscribe"] = done["body"]
out["sync_run"] = fal_client.run(app, arguments={"n": 2}, path="/echo")["body"]
print(json.dumps(out))
"""


async def _client(s: QStack, cert: Path, key: str) -> dict[str, object]:
    host = s.url.removeprefix("https://")
    env = {**os.environ, "FAL_KEY": key, "FAL_RUN_HOST": host,
           "FAL_QUEUE_RUN_HOST": f"{host}/queue", "SSL_CERT_FILE": str(cert)}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    return dict(json.loads(out))


def test_unmodified_fal_client_over_tls(tmp_path: Path) -> None:
    cert, key_file = self_signed(tmp_path)

    async def main() -> dict[str, object]:
        async with queue_stack(tmp_path / "data", tls=(cert, key_file)) as s:
            s.deploy("echo", auth="private", max_concurrency=1)
            _, key = s.keyring.create(OWNER)
            out = await _client(s, cert, key)
            out["ran"] = [c[0] for c in s.calls("echo")]
            return out

    out = asyncio.run(main())
    rid = out["request_id"]
    assert out["seen"][-1] == "Completed" and out["rebuilt_status"] == "Completed"
    assert out["result"]["path"] == "/log" and json.loads(out["result"]["body"]) == {"text": "hi"}
    assert f"endpoint log line {rid}" in out["logs"]
    assert out["rebuilt_result"] == "/log"
    assert out["cancelled"] == [499, "client_cancelled"]
    assert out["cancel_status"] == "client_cancelled" and out["queued"] == "Queued"
    assert json.loads(out["subscribe"]) == {"n": 1} and json.loads(out["sync_run"]) == {"n": 2}
    # log, hang, subscribe and the sync run; the cancelled queued one never ran
    assert len(out["ran"]) == 4
