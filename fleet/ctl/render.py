"""Output: rich tables for people, JSON for scripts, one line for errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

PIPED_WIDTH = 4096  # columns of a table written to a pipe: a line a row, unwrapped


def make_consoles() -> tuple[Console, Console]:
    # file=None: rich writes to whatever sys.stdout/stderr is at write time,
    # which is what lets click's test runner capture it. Piped (and no
    # COLUMNS given), a table is not wrapped at 80 columns: scripts read it
    # a line a row. NO_COLOR: no escape sequences at all, bold included.
    plain = "NO_COLOR" in os.environ
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(
        highlight=False,
        soft_wrap=False,
        width=PIPED_WIDTH if piped else None,
        color_system=None if plain else "auto",
    ), Console(stderr=True, highlight=False, soft_wrap=True, color_system=None if plain else "auto")


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def emit_json_line(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def parse_time(value: Optional[str]) -> Optional[dt.datetime]:
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def ago(value: Optional[str], now: Optional[dt.datetime] = None) -> str:
    """'3m ago', 'in 2h', or '-' for never."""
    when = parse_time(value)
    if when is None:
        return "-"
    now = now or dt.datetime.now(dt.timezone.utc)
    seconds = int((now - when).total_seconds())
    future, seconds = seconds < 0, abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds // size}{unit}"
            break
    else:
        text = f"{seconds}s"
    return f"in {text}" if future else f"{text} ago"


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list):
        return escape(", ".join(map(str, value)))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return escape(str(value))


STATUS_STYLE = {
    "online": "green",
    "offline": "red",
    "pending": "yellow",
    "succeeded": "green",
    "warning": "yellow",
    "failed": "red",
    "lost": "red",
    "cancelled": "magenta",
    "running": "cyan",
    "queued": "blue",
    "active": "green",
    "revoked": "red",
    "expired": "yellow",
}


def status(value: Optional[str]) -> str:
    if not value:
        return "-"
    style = STATUS_STYLE.get(value)
    return f"[{style}]{escape(value)}[/]" if style else escape(value)


def table(
    console: Console,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    empty: str = "nothing to show",
) -> None:
    rows = list(rows)
    if not rows:
        console.print(f"[dim]{escape(empty)}[/]")
        return
    t = Table(show_edge=False, box=None, pad_edge=False, header_style="bold")
    for name in columns:
        t.add_column(name, overflow="fold")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def fields(console: Console, pairs: Sequence[tuple[str, str]]) -> None:
    """A key/value block for `show` commands; values are rich markup (see cell)."""
    t = Table(show_header=False, show_edge=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for key, value in pairs:
        t.add_row(key, value)
    console.print(t)
