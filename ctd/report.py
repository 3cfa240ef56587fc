"""What people look at: terminal tables, progress bars, plots."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, Path], metrics: list[str], path: Path) -> Path:
    """Training curves from Lightning CSV logs (one line per run, one panel per metric)."""
    import csv

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, csv_path in runs.items():
            rows = [r for r in csv.DictReader(Path(csv_path).open()) if r.get(metric)]
            if rows:
                ax.plot([int(r["step"]) for r in rows], [float(r[metric]) for r in rows],
                        label=label, marker="." if len(rows) < 30 else None)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(values: dict[str, dict[str, float]], ylabel: str, path: Path) -> Path:
    """Grouped bars: values[group][series], e.g. bpb per corpus per model."""
    plt = _pyplot()
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) * len(series) / 2), 3.8))
    for i, s in enumerate(series):
        xs = [g + i * width for g in range(len(groups))]
        ys = [values[g].get(s, float("nan")) for g in groups]
        bars = ax.bar(xs, ys, width, label=s)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    fmt = lambda c: f"{c:.4f}" if isinstance(c, float) else str(c)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
