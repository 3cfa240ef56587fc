"""What people look at: terminal tables, progress bars, plots."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


@lru_cache(maxsize=1)
def console() -> Console:
    return Console(stderr=False, highlight=False)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], title: str | None = None) -> Table:
    t = Table(*header, title=title)
    for row in rows:
        t.add_row(*(f"{c:.4f}" if isinstance(c, float) else str(c) for c in row))
    return t


def progress(**kwargs) -> Progress:
    """A progress bar on stderr (kept off when stderr is not a terminal and CI is set)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        **kwargs,
    )
