"""What people look at: terminal tables, progress bars, plots."""

from __future__ import annotations

import sys
import time
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
    """stdout; piped into a file or grep it is as wide as the text (not rich's 80 columns, which
    truncated names)."""
    return Console(stderr=False, highlight=False,
                   width=None if sys.stdout.isatty() else 1000)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], title: str | None = None) -> Table:
    t = Table(*header, title=title)
    for row in rows:
        t.add_row(*(f"{c:.4f}" if isinstance(c, float) else str(c) for c in row))
    return t


class _Progress(Progress):
    """rich's bar; where stderr is a file (a log, CI) rich draws nothing until the end, so a
    plain line per task every `every` seconds (and when it completes) shows the work moving."""

    every = 30.0

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.console.is_terminal or self.disable:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        last = task.fields.get("_printed", task.start_time or now)
        if now - last >= self.every or (task.total is not None and task.completed >= task.total):
            task.fields["_printed"] = now
            total = f"/{task.total:,.0f}" if task.total is not None else ""
            print(f"{task.description}: {task.completed:,.0f}{total} {task.fields.get('info', '')}"
                  f" ({task.elapsed or 0:.0f} s)", file=sys.stderr, flush=True)


def progress(**kwargs) -> Progress:
    """A progress bar on stderr; plain periodic lines where stderr is not a terminal."""
    return _Progress(
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


def run_curves(run: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of one metric over a training run directory's CSV logs
    (`logs/version_N/metrics.csv`, one per start of the run; a resumed run logs the steps since
    its checkpoint again, and the later value of a step wins)."""
    import csv

    files = sorted(Path(run).glob("logs/version_*/metrics.csv"),
                   key=lambda p: int(p.parent.name.removeprefix("version_")))
    values: dict[int, float] = {}
    for f in files:
        values |= {int(r["step"]): float(r[metric]) for r in csv.DictReader(f.open())
                   if r.get(metric)}
    return sorted(values.items())


def plot_series(panels: dict[str, dict[str, list[tuple[float, float]]]], xlabel: str,
                path: Path) -> Path:
    """One panel per key, one line per series; y axes fitted to the data, not to 0, so the
    differences between series show."""
    plt = _pyplot()
    panels = {k: v for k, v in panels.items() if any(v.values())}
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.5),
                             squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: dict[str, Path], metrics: list[str], path: Path) -> Path:
    """Training curves of run directories (one line per run, one panel per metric)."""
    return plot_series({m: {label: run_curves(run, m) for label, run in runs.items()}
                        for m in metrics}, "step", path)


def plot_bars(values: dict[str, dict[str, float]], ylabel: str, path: Path,
              fmt: str = "%.3f") -> Path:
    """Grouped bars: values[group][series], e.g. bpb per corpus per model; the y axis spans the
    values (a bar chart from 0 would hide differences of a few percent), with a line at 0 when
    they have both signs. `fmt`: the bars' labels."""
    import math

    plt = _pyplot()
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) * len(series) / 2), 3.8))
    for i, s in enumerate(series):
        xs = [g + i * width for g in range(len(groups))]
        ys = [values[g].get(s, float("nan")) for g in groups]
        bars = ax.bar(xs, ys, width, label=s)
        ax.bar_label(bars, fmt=fmt, fontsize=7)
    finite = [v for g in values.values() for v in g.values() if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
        ax.set_ylim(lo - pad, hi + pad)
        if lo < 0 < hi:
            ax.axhline(0, color="black", linewidth=0.6)
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
