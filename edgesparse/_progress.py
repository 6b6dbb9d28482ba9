"""Rich progress bars for the long steps (training, fine-tuning, calibration, export)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Progress and status go to stderr so stdout stays clean for tables and JSON.
console = Console(stderr=True)


def enabled() -> bool:
    return not os.environ.get("EDGESPARSE_QUIET") and sys.stderr.isatty()


@contextlib.contextmanager
def bar(description: str, total: int | None) -> Iterator:
    """A progress bar; `advance(n=1, **fields)` moves it. Silent when stderr is not a terminal."""
    if not enabled():
        yield lambda *a, **k: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")
        yield lambda n=1, info="": progress.update(task, advance=n, info=info)


def track(items: Iterable, description: str, total: int) -> Iterator:
    with bar(description, total) as advance:
        for item in items:
            yield item
            advance()


@contextlib.contextmanager
def status(message: str) -> Iterator:
    """A spinner for a step without a count (export, lowering)."""
    if not enabled():
        yield
        return
    with console.status(message):
        yield
