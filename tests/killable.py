"""A `ctd distill` run in a subprocess for the crash tests (tests/test_robust.py):

    python -m tests.killable ROOT OUT LOSSES [--resume] [--die-in-checkpoint STEP] [--hold S]

ROOT is a `zoo_dir` (tests/conftest.py); each optimizer step's loss is appended to LOSSES
(one JSON line, flushed). `--die-in-checkpoint STEP` SIGKILLs the process half-way through
writing the checkpoint of that step; `--hold S` sleeps S seconds inside the run (to test the
run-directory lock).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl


class LossLog(pl.Callback):
    def __init__(self, path: Path, hold: float):
        self.path, self.hold = path, hold

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step,
                                "loss": float(trainer.callback_metrics["train/loss"])}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        time.sleep(self.hold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("losses", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--die-in-checkpoint", type=int)
    ap.add_argument("--hold", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()

    import torch

    import ctd.train
    from ctd.errors import CtdError
    from tests.tiny import distill_config

    torch.set_num_threads(1)
    if a.die_in_checkpoint is not None:
        save = torch.save

        def half_then_die(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if getattr(f, "name", "") and ".tmp" in str(f.name) and \
                    obj.get("global_step") == a.die_in_checkpoint:
                f.flush()
                f.truncate(f.tell() // 2)  # half the bytes are on disk, the rename not done
                os.kill(os.getpid(), signal.SIGKILL)

        ctd.train.torch.save = half_then_die
    cfg = distill_config(a.root, max_steps=a.steps, checkpoint_every=2)
    try:
        ctd.train.distill(cfg, a.out, resume=a.resume, callbacks=(LossLog(a.losses, a.hold),))
    except CtdError as e:
        print(f"ctd: error: {e}", flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
