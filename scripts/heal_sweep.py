"""The heal experiment: where does ALM beat plain fine-tuning? Prints and writes JSON, and plots.

Gemma-3-270M moved onto SmolLM2's tokenizer (OMP) is healed by self-distillation in three arms
on the same data, order and steps: CLM only, ALM only, ALM + CLM (balanced). Each arm first
runs a small sweep (learning rate x what trains) of short runs; its best setting by validation
bits per byte is then run at the full budget. Every final arm is evaluated on test text of the
training domain (wiki-en) and two others (python-docs, gsm-symbolic problem + answer), on
agreement with the teacher (validation, mean |l_T - l_S| per chunk) and by greedy
continuations. Test numbers are only reported, never used for a choice.

Everything is the heal recipe (ctd.recipes.heal): the sweep is one recipe run under
`<out>/sweep`, the final one under `<out>`; each arm's model is kept at `<out>/<arm>/model`.
Both reuse one teacher cache (same rows, same teacher).

    python scripts/heal_sweep.py --out runs/heal-experiment
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from ctd.config import DataConfig, OptimConfig, TrainConfig
from ctd.losses.objective import LossSpec
from ctd.numerics import machine
from ctd.recipes.heal import Arm, EvalConfig, HealConfig, gap_closed, run, validation

ARMS = {"clm": ["clm"], "alm": ["alm"], "alm+clm": ["alm", "clm"]}


def config(args, arms: dict[str, Arm], steps: int, out: Path, corpora: list[str]) -> HealConfig:
    return HealConfig(
        data=DataConfig(corpus="wiki-en", max_length=args.max_length, batch_size=args.batch_size,
                        max_documents=args.documents, val_documents=args.val_documents),
        optim=OptimConfig(lr=1e-5, warmup_steps=max(steps // 10, 1)),
        train=TrainConfig(max_steps=steps, checkpoint_every=max(steps // 4, 1),
                          val_every=max(steps // args.val_points, 1), threads=args.threads),
        arms=arms, eval=EvalConfig(corpora=corpora, bytes=args.eval_bytes), out=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--sweep", nargs="+", default=["all@1e-5", "all@3e-5", "lora@1e-4",
                                                   "lora@3e-4"],
                    help="trainable@lr settings each arm tries")
    ap.add_argument("--sweep-steps", type=int, default=80)
    ap.add_argument("--steps", type=int, default=300, help="the final arms' budget")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--documents", type=int, default=2400, help="wiki-en training documents")
    ap.add_argument("--val-documents", type=int, default=32)
    ap.add_argument("--val-points", type=int, default=6, help="validations per run")
    ap.add_argument("--eval-bytes", type=int, default=100_000)
    ap.add_argument("--corpora", nargs="+", default=["wiki-en", "python-docs", "gsm-symbolic"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/heal-experiment"))
    args = ap.parse_args()
    out = args.out.resolve()
    started = time.time()

    # 1. The sweep: every arm at every setting, short runs, validation only.
    sweep = {}
    for arm in args.arms:
        for setting in args.sweep:
            trainable, lr = setting.split("@")
            sweep[f"{arm}@{setting}"] = Arm([LossSpec(n) for n in ARMS[arm]], float(lr),
                                            trainable)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        run(config(args, sweep, args.sweep_steps, out / "sweep", []))
    curves = {name: validation(out / "sweep" / name) for name in sweep}
    best = {arm: min((name for name in sweep if name.startswith(f"{arm}@")),
                     key=lambda n: curves[n]["val/bpb"][-1][1]) for arm in args.arms}

    # 2. The final arms at their best setting, full budget, evaluated on test.
    final = {arm: sweep[best[arm]] for arm in args.arms}
    with contextlib.redirect_stdout(sys.stderr):
        report = run(config(args, final, args.steps, out, args.corpora))
    stages = out / "stages"
    bpb = {corpus: {name: json.loads((stages / f"bpb-{corpus}-{name}.json").read_text())["bpb"]
                    for name in ["original", "transplanted", *final]}
           for corpus in args.corpora}
    val = {arm: validation(out / arm) for arm in final}
    result = {
        "command": " ".join(sys.argv), "machine": machine(), "hours": (time.time() - started) / 3600,
        "setup": {"base": "gemma3-270m", "tokenizer": "smollm2-135m", "steps": args.steps,
                  "batch": [args.batch_size, args.max_length], "documents": args.documents,
                  "sweep_steps": args.sweep_steps},
        "sweep": {name: {"final_val_bpb": c["val/bpb"][-1][1],
                         "final_val_agreement": c.get("val/agreement", [(0, None)])[-1][1]}
                  for name, c in curves.items()},
        "chosen": best,
        "test_bpb": bpb,
        "gap_closed": {corpus: {arm: gap_closed(b, arm) for arm in final}
                       for corpus, b in bpb.items()},
        "val_agreement": {arm: v["val/agreement"][-1][1] for arm, v in val.items()},
        "val_curves": val, "report": str(report),
    }
    (out / "heal_sweep.json").write_text(json.dumps(result, indent=1))
    plot_validation(val, out / "validation.png")
    print(json.dumps(result, indent=1))


def plot_validation(val: dict[str, dict], path: Path) -> None:
    """Validation bpb and agreement per arm, y axes fitted to the data (from step 0)."""
    from ctd.report import plot_series

    plot_series({key: {arm: curves[key] for arm, curves in val.items() if key in curves}
                 for key in ("val/bpb", "val/agreement")}, "step", path)


if __name__ == "__main__":
    main()
