"""A queue-serving process for the restart tests: ``queue_stack`` until SIGTERM.

``python tests/queue_server.py DATA_DIR READY_FILE`` deploys ``alice/slow`` (one runner at a
time) on first start, writes ``{"url": ...}`` to READY_FILE once it listens, and serves until
SIGTERM. The tests kill it with SIGKILL or SIGTERM and start it again on the same DATA_DIR.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from queue_helpers import OWNER, queue_stack


async def main(data: Path, ready: Path) -> None:
    async with queue_stack(data) as s:
        if s.store.resolve(OWNER, "slow") is None:
            s.deploy("slow", max_concurrency=1)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.write_text(json.dumps({"url": s.url}))
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
