"""What people look at: progress where stderr is a log file, not a terminal."""

from __future__ import annotations

from ctd import report


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(report._Progress, "every", 0.0)
    with report.progress() as bar:  # pytest captures stderr: not a terminal
        task = bar.add_task("teacher cache train", total=3, info="")
        for i in range(3):
            bar.update(task, completed=i + 1, info=f"{10 * i} tokens/s")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("teacher cache")]
    assert lines[:3] == [f"teacher cache train: {i + 1}/3 {10 * i} tokens/s (0 s)"
                         for i in range(3)]


def test_progress_lines_are_spaced_out(capsys):
    with report.progress() as bar:  # the default interval: only the completion line this fast
        task = bar.add_task("aligning", total=100, info="")
        for i in range(100):
            bar.update(task, completed=i + 1)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("aligning:")]
    assert lines == ["aligning: 100/100  (0 s)"]


def test_disabled_progress_prints_nothing(capsys):
    with report.progress(disable=True) as bar:
        task = bar.add_task("quiet", total=1, info="")
        bar.update(task, completed=1)
    assert "quiet" not in capsys.readouterr().err
