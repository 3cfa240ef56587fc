"""Runs that survive what happens to real runs: kill -9 at any moment, two runs aimed at one
directory, a full disk, a corpus with documents a tokenizer cannot reproduce."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ctd.collate import Aligner
from ctd.corpora import load_corpus
from ctd.data import aligned_rows, row_stats
from ctd.errors import CtdError
from ctd.io import RunLock, atomic_dir
from ctd.report import run_curves
from ctd.train import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]


def _start(root: Path, out: Path, losses: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.killable", str(root), str(out),
                             str(losses), *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _losses(path: Path) -> dict[int, float]:
    """step -> loss; a step logged again after a resume replaces the killed run's."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def whole(zoo_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("whole")
    proc = _start(zoo_dir, tmp / "run", tmp / "losses.jsonl")
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    return tmp


def _checkpoint_step(out: Path) -> int:
    return int(torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"])


@pytest.mark.parametrize("how", ["mid-checkpoint-write", "random-moment"])
def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(zoo_dir, tmp_path, whole, how):
    uninterrupted = _losses(whole / "losses.jsonl")
    out, losses = tmp_path / "run", tmp_path / "losses.jsonl"
    if how == "mid-checkpoint-write":  # killed half-way through writing step 4's checkpoint
        proc = _start(zoo_dir, out, losses, "--die-in-checkpoint", "4")
        assert proc.wait(timeout=600) == -signal.SIGKILL
        assert _checkpoint_step(out) == 2  # the previous checkpoint, intact
    else:  # killed at a random moment after the first checkpoint
        proc = _start(zoo_dir, out, losses, "--hold", "0.3")
        while not (out / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(random.Random(os.getpid()).uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    saved = _checkpoint_step(out)
    resumed = _start(zoo_dir, out, losses, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    got = _losses(losses)
    assert sorted(got) == sorted(uninterrupted)
    for step in range(saved + 1, max(uninterrupted) + 1):  # the curve continues exactly
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-7), step
    assert (out / "model" / "config.json").exists()
    assert not list(out.rglob("*.tmp*"))  # nothing half-written is left to trip over
    # the logged curve continues too (two log versions, joined)
    got, want = run_curves(out, "train/clm"), run_curves(whole / "run", "train/clm")
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


def test_a_second_run_into_the_same_directory_is_refused(zoo_dir, tmp_path):
    out = tmp_path / "run"
    first = _start(zoo_dir, out, tmp_path / "a.jsonl", "--hold", "5")  # outlives the second
    while not (out / "config.json").exists():
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    second = _start(zoo_dir, out, tmp_path / "b.jsonl", "--resume")
    assert second.wait(timeout=300) == 2
    message = second.stdout.read()
    assert f"pid {first.pid}" in message and "is in use" in message
    while not (out / "checkpoints" / "last.ckpt").exists():
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # a dead owner's lock is taken over, with a warning
    first.wait()
    third = _start(zoo_dir, out, tmp_path / "c.jsonl", "--resume")
    assert third.wait(timeout=600) == 0
    assert f"locked by pid {first.pid}" in third.stdout.read()


def test_lock_in_process(tmp_path):
    with RunLock(tmp_path / "d"):
        with pytest.raises(CtdError, match="is in use by pid"):
            RunLock(tmp_path / "d").__enter__()
    assert not (tmp_path / "d").exists()  # nothing written: nothing left behind


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (skipped where this machine cannot mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]}); run as root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_is_one_line_and_keeps_the_previous_result(small_disk):
    with atomic_dir(small_disk / "out") as d:
        (d / "small.bin").write_bytes(b"x" * 1000)
    with pytest.raises(CtdError, match="no space left on the device while writing .*out"):
        with atomic_dir(small_disk / "out", overwrite=True) as d:
            (d / "big.bin").write_bytes(os.urandom(4 << 20))
    assert [p.name for p in small_disk.iterdir()] == ["out"]  # no temporary left behind
    assert (small_disk / "out" / "small.bin").read_bytes() == b"x" * 1000  # previous intact
    ckpt = small_disk / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, ckpt)
    with pytest.raises(CtdError, match="cannot write checkpoint .*intact"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1 << 20)}, ckpt)
    assert torch.load(ckpt) == {"step": 1} and not list(small_disk.glob(".last*"))


def test_transplant_into_a_full_disk(small_disk, capsys, gemma_tok, smol_tok, tmp_path):
    from ctd.cli import main
    from tests.tiny import tiny_model

    for name, tok, arch in (("base", gemma_tok, "gemma3"), ("donor", smol_tok, "llama")):
        tiny_model(tok, arch).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with pytest.raises(SystemExit) as e:
        main(["transplant", "--base", str(tmp_path / "base"), "--tokenizer",
              str(tmp_path / "donor"), "--method", "fvt", "--out", str(small_disk / "moved")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert e.value.code == 2 and len(lines) == 1 and "ctd: error: no space left" in lines[0]
    assert list(small_disk.iterdir()) == []


def test_outputs_get_the_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as d:
            (d / "f").write_text("x")
            save_file({"w": torch.zeros(2)}, d / "model.safetensors")  # written 0600 by safetensors
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "f": 0o644, "model.safetensors": 0o644}


# Documents SmolLM2's byte-level vocabulary cannot reproduce (it has no token for these bytes)
_BAD = ["sparkline \x04\x06 bytes", "bell \x13\x14", "plane 4: \U00040000 here", "\x1d group"]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(["The cat sat on the mat.", "Über café, naïve 🤗!",
                                 "Numbers 12 345 and tabs\tand\nnewlines."]), min_size=6,
                max_size=14),
       st.lists(st.sampled_from(_BAD), min_size=1, max_size=3), st.randoms())
def test_unencodable_documents_are_skipped_and_counted(tmp_path_factory, smol_tok, gemma_tok,
                                                       good, bad, rnd):
    """Planted documents the student's tokenizer cannot reproduce are counted exactly; every
    other document is trained on whole (bytes in the windows = bytes of the good documents)."""
    docs = good + bad
    rnd.shuffle(docs)
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    aligner = Aligner(gemma_tok, smol_tok, max_length=8)  # windows of 8 tokens
    rows = aligned_rows(load_corpus(str(path), "all"), aligner)
    s = row_stats(rows)
    assert s["unencodable_student_documents"] == len(bad)
    assert s["unencodable_student_bytes"] == sum(len(d.encode()) for d in bad)
    assert s["unencodable_teacher_documents"] == 0 and len(s["unencodable_examples"]) == min(
        3, len(bad))
    assert s["bytes"] == sum(len(d.encode()) for d in good)
    assert int(np.sum(rows["num_bytes"])) == s["bytes"]
    with pytest.raises(CtdError, match="document .* byte-exactly"):
        Aligner(gemma_tok, smol_tok, strict=True).rows([{"text": d} for d in docs])
