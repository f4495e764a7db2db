"""Output for the CLI: JSON, tables, panels, dimmed log lines, warnings.

rich is imported inside the functions that draw, so ``fal --help`` and JSON output never pay
for it. Consoles are made per call because the CLI's stdout / stderr may be swapped (tests).
Without a TTY rich emits plain text: no colours, no spinners, no box-drawing surprises.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "console",
    "format_time",
    "print_json",
    "print_kv",
    "print_log",
    "print_table",
    "print_urls",
    "print_warning",
    "status",
]


def _plain(*, stderr: bool = False) -> bool:
    """No terminal (and nothing forcing one): plain text, without importing rich (~60 ms)."""
    stream = sys.stderr if stderr else sys.stdout
    forced = os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") == "1"
    isatty = getattr(stream, "isatty", None)
    return not forced and not (isatty is not None and isatty())


def console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def format_time(ts: Any) -> str:
    if not isinstance(ts, int | float) or not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table on a TTY; tab-separated columns with a header line otherwise."""
    if _plain() or not (out := console()).is_terminal:
        sys.stdout.write("\t".join(c.upper() for c in columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(_cell(v) for v in row) + "\n")
        sys.stdout.flush()
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_kv(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        sys.stdout.write(f"{key.ljust(width)}  {_cell(value)}\n")
    sys.stdout.flush()


def print_urls(title: str, urls: Sequence[tuple[str, str]]) -> None:
    """The URLs of a deployed app: a panel on a TTY, plain ``label: url`` lines otherwise."""
    if _plain() or not (out := console()).is_terminal:
        sys.stdout.write(title + "\n")
        for label, url in urls:
            sys.stdout.write(f"  {label}: {url}\n")
        sys.stdout.flush()
        return
    from rich.panel import Panel
    from rich.text import Text

    body = Text()
    for i, (label, url) in enumerate(urls):
        body.append(("\n" if i else "") + f"{label}: ", style="bold")
        body.append(url, style="cyan")
    out.print(Panel(body, title=title, title_align="left", expand=False))


def print_log(message: str, *, prefix: str = "", stderr: bool = True) -> None:
    """One log line, dimmed on a TTY (build logs, runner logs)."""
    line = f"{prefix}{message.rstrip()}"
    if _plain(stderr=stderr) or not (out := console(stderr=stderr)).is_terminal:
        stream = sys.stderr if stderr else sys.stdout
        stream.write(line + "\n")
        stream.flush()
        return
    from rich.text import Text

    out.print(Text(line, style="dim"))


def print_warning(message: str) -> None:
    sys.stderr.write(f"Warning: {message}\n")
    sys.stderr.flush()


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on a TTY (stderr); nothing at all without one."""
    if _plain(stderr=True) or not (err := console(stderr=True)).is_terminal:
        yield
        return
    with err.status(message):
        yield
