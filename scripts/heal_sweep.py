"""Healing arms side by side at demo scale: loss sets x learning rates; prints JSON.

Each arm heals the same transplant (the demo's, or `--transplant DIR`) with the demo's data,
steps and batch (`ctd.recipes.heal.demo_config`), and reports its validation bpb curve
(wiki-en validation documents, the student read through its own tokenizer) next to the
teacher's bpb on the same documents. Arms run one after another; finished ones are reused.

    .venv/bin/python scripts/heal_sweep.py --arms alm,clm clm alm,alm_hidden,clm --lrs 1e-5 3e-5
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ctd.losses.objective import LossSpec
from ctd.recipes.heal import demo_config, heal_arm
from ctd.transplant.run import transplant


def val_curve(metrics: Path) -> tuple[list[tuple[int, float]], float | None]:
    rows = list(csv.DictReader(metrics.open()))
    curve = [(int(r["step"]), float(r["val/bpb"])) for r in rows if r.get("val/bpb")]
    teacher = [float(r["val/teacher_bpb"]) for r in rows if r.get("val/teacher_bpb")]
    return curve, (teacher[0] if teacher else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["alm,clm", "clm"],
                    help="comma-separated loss names per arm")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-5])
    ap.add_argument("--transplant", type=Path, default=None,
                    help="a transplanted model (default: made under --out like the demo's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/heal-sweep"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = demo_config(args.out)
    moved = args.transplant
    if moved is None:
        moved = args.out / "transplant"
        if not moved.exists():
            with contextlib.redirect_stdout(sys.stderr):
                transplant(cfg.base, cfg.tokenizer, moved, method=cfg.method, k=cfg.k)
    report = {"base": cfg.base, "tokenizer": cfg.tokenizer, "steps": cfg.steps,
              "batch": [cfg.batch_size, cfg.max_length], "arms": {}}
    for lr in args.lrs:
        for arm in args.arms:
            name = f"{arm.replace(',', '+')}@{lr:g}"
            out = args.out / name
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
                heal_arm(dataclasses.replace(cfg, lr=lr), moved.resolve(),
                         [LossSpec(loss) for loss in arm.split(",")], out)
            curve, teacher = val_curve(out / "logs" / "version_0" / "metrics.csv")
            report["arms"][name] = {"val_bpb": curve, "final_val_bpb": curve[-1][1]}
            if teacher is not None:
                report["teacher_val_bpb"] = teacher
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
