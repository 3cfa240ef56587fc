"""Heal a transplant: move a model onto another tokenizer (OMP), then repair it by
self-distillation (teacher = the original model with its own tokenizer) in one or more arms
that differ in their losses (and, where a sweep chose them, their learning rate and what
trains), all on the same data, steps and order.

    ctd heal --recipe configs/recipes/heal.yaml      # the full recipe
    ctd demo                                          # the same at demo scale

The config is a `ctd distill` config (models, data, optim, train, balance) plus the recipe's own
keys: base, tokenizer, transplant, arms, eval. Every step stores its result under `out/` when it
finishes; running the recipe again continues from what is done and rewrites the report.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ctd.card import distill_card
from ctd.config import (
    DataConfig,
    DistillConfig,
    ModelsConfig,
    OptimConfig,
    Trainable,
    TrainConfig,
    free_keys,
)
from ctd.corpora import load_texts
from ctd.io import Stages
from ctd.losses.objective import Balance, LossSpec
from ctd.report import console, markdown_table, plot_bars, plot_curves
from ctd.transplant.run import transplant
from ctd.zoo import load_model, load_tokenizer

PROMPTS = ["The capital of France is", "Water is made of", "def fibonacci(n):",
           "The first man on the Moon was"]


@dataclass
class TransplantConfig:
    """How the base is moved onto the tokenizer (ctd transplant's method, k and fast mode)."""

    method: str = "omp"
    k: int | None = None
    fast: bool = False


@dataclass
class Arm:
    """One healing arm: its losses, and what it sets differently from the shared run (a
    sweep's choice): learning rate, what trains."""

    losses: list[LossSpec]
    lr: float | None = None
    trainable: Trainable | None = None


@dataclass
class EvalConfig:
    """Held-out evaluation: bpb on the first `bytes` of each corpus's test split, greedy
    continuations of `prompts`."""

    corpora: list[str] = field(default_factory=lambda: ["wiki-en", "python-docs",
                                                        "gsm-symbolic"])
    bytes: int = 100_000
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    max_new_tokens: int = 24


def _default_arms() -> dict[str, Arm]:
    return {"alm+clm": Arm([LossSpec("alm"), LossSpec("clm")]), "clm": Arm([LossSpec("clm")])}


@dataclass
class HealConfig:
    """The heal recipe. Args:
        base: the model to move (its body is kept; it is also the teacher).
        tokenizer: the tokenizer to move it onto (a model name makes that model the OMP donor).
        transplant: the transplant method.
        models: what of the student trains (teacher and student are the base and the transplant).
        data, balance, optim, train: the healing run, as in `ctd distill` (every arm the same).
        arms: name -> losses (and the arm's own lr / trainable, if a sweep chose them).
        eval: held-out corpora, bytes, prompts.
        out: recipe directory (never deleted; a second run continues it).
    """

    base: str = "gemma3-270m"
    tokenizer: str = "smollm2-135m"
    transplant: TransplantConfig = field(default_factory=TransplantConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(corpus="wiki-en"))
    balance: Balance = "grad_norm"
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arms: dict[str, Arm] = field(default_factory=_default_arms)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: Path = Path("runs/heal")


def demo_config(out: Path = Path("runs/demo")) -> HealConfig:
    """The heal recipe at a scale a 2-core CPU finishes in minutes (see docs/benchmarks.md):
    60 steps of 4 x 128 tokens at the learning rate the heal experiment's sweep chose for both
    arms (3e-5), on 300 documents (about as many windows as the run reads, so the teacher cache
    holds no more than training uses)."""
    from ctd.corpora import CORPORA, available

    return HealConfig(
        data=DataConfig(corpus="wiki-en", max_length=128, batch_size=4, max_documents=300,
                        val_documents=16),
        optim=OptimConfig(lr=3e-5, warmup_steps=6),
        train=TrainConfig(max_steps=60, checkpoint_every=15, val_every=15),
        eval=EvalConfig(corpora=[c for c in CORPORA if available(c)], bytes=10_000,
                        prompts=PROMPTS[:2]),
        out=out)


def arm_config(cfg: HealConfig, student: Path, arm: Arm) -> DistillConfig:
    """The `ctd distill` config of one arm."""
    return DistillConfig(
        models=dataclasses.replace(cfg.models, teacher=cfg.base, student=str(student),
                                   trainable=arm.trainable or cfg.models.trainable),
        data=cfg.data, losses=arm.losses, balance=cfg.balance,
        optim=dataclasses.replace(cfg.optim, lr=arm.lr or cfg.optim.lr), train=cfg.train)


def heal_arm(cfg: HealConfig, student: Path, arm: Arm, out: Path) -> dict:
    """One healing arm; continues its last checkpoint if an earlier run was interrupted."""
    from ctd.train import distill_step  # Lightning: imported when training, not by the CLI

    return distill_step(arm_config(cfg, student, arm), out)


def _bpb(model, tokenizer, texts: list[str]) -> dict:
    # imported here: every verb's parser reads this module's configs, and ctd.evaluate brings
    # torchmetrics (1.6 s of start-up)
    from ctd.evaluate import bits_per_byte

    return bits_per_byte(load_model(model), load_tokenizer(tokenizer), texts).as_dict()


def _continue(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    from ctd.evaluate import greedy_generate

    return greedy_generate(load_model(model), load_tokenizer(tokenizer), prompts,
                           max_new_tokens=max_new_tokens, progress=False)


def run(cfg: HealConfig) -> Path:
    """Transplant, heal in every arm, evaluate, report. Returns the report path."""
    out = Path(cfg.out).expanduser().resolve()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    stages = Stages(out, asdict(cfg), free_keys(HealConfig))

    # 1. Transplant the base onto the new tokenizer (training-free).
    transplanted = out / "transplant"
    t = cfg.transplant
    report = stages.once("transplant", transplant, cfg.base, cfg.tokenizer, transplanted,
                         method=t.method, k=t.k, fast=t.fast, overwrite=True)

    # 2. Heal: each arm on the same data, steps and order.
    summaries = {name: stages.once(f"arm-{name}", heal_arm, cfg, transplanted, arm, out / name)
                 for name, arm in cfg.arms.items()}

    # 3. Bits per byte on held-out text of every corpus (tokenizer independent).
    models = {"original": (cfg.base, cfg.base), "transplanted": (transplanted, transplanted)}
    models |= {name: (out / name / "model",) * 2 for name in cfg.arms}
    bpb: dict[str, dict[str, float]] = {}
    for corpus in cfg.eval.corpora:
        texts = load_texts(corpus, "test", cfg.eval.bytes)
        for name, (model, tok) in models.items():
            result = stages.once(f"bpb-{corpus}-{name}", _bpb, model, tok, texts)
            bpb.setdefault(corpus, {})[name] = result["bpb"]

    for name, summary in summaries.items():  # each healed model's card, with its numbers
        run_dir = out / name
        distill_card(run_dir / "model", json.loads((run_dir / "config.json").read_text()),
                     summary["steps"], run_dir, summary.get("data"), kind="heal",
                     command=f"ctd heal --recipe {out / 'recipe.json'}",
                     bpb={f"{corpus} test, first {cfg.eval.bytes:,} bytes": {
                         "bpb": bpb[corpus][name],
                         "command": f"ctd eval --model {run_dir / 'model'} --corpus {corpus} "
                                    f"--split test --max-bytes {cfg.eval.bytes}"}
                          for corpus in bpb} or None)

    # 4. Greedy continuations of fixed prompts.
    continuations = {
        name: stages.once(f"continue-{name}", _continue, model, tok, cfg.eval.prompts,
                          cfg.eval.max_new_tokens)
        for name, (model, tok) in models.items()
    }
    return write_report(cfg, out, report, bpb, continuations)


def gap_closed(bpb: dict[str, float], arm: str) -> float:
    """Fraction of the transplant's bpb gap to the original that healing recovered."""
    gap = bpb["transplanted"] - bpb["original"]
    return (bpb["transplanted"] - bpb[arm]) / gap if gap else float("nan")


def validation(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Validation curves of one arm: val/bpb, val/agreement, val/teacher_bpb as (step, value)."""
    from ctd.report import run_curves

    curves = {k: run_curves(run_dir, k)
              for k in ("val/bpb", "val/agreement", "val/teacher_bpb")}
    return {k: v for k, v in curves.items() if v}


def write_report(cfg: HealConfig, out: Path, transplant_report: dict, bpb: dict,
                 continuations: dict) -> Path:
    """report.md with the numbers, plus bpb.png, gap_closed.png and curves.png."""

    arms = list(cfg.arms)
    if bpb:
        plot_bars(bpb, "bits per byte (lower is better)", out / "bpb.png")
        # per corpus on one scale: how much of the transplant's loss each arm won back
        plot_bars({c: {a: 100 * gap_closed(v, a) for a in arms} for c, v in bpb.items()},
                  "% of the transplant's bpb gap closed\n(higher is better; < 0: worse)",
                  out / "gap_closed.png", fmt="%.0f%%")
    plot_curves({a: out / a for a in arms},
                ["train/clm", "train/alm", "val/bpb", "val/agreement"], out / "curves.png")
    names = list(next(iter(bpb.values()))) if bpb else []
    agreement = {a: (validation(out / a).get("val/agreement") or [(0, float("nan"))])[-1][1]
                 for a in arms}
    rows = [[corpus, *(bpb[corpus][n] for n in names),
             *(f"{gap_closed(bpb[corpus], a):.0%}" for a in arms)] for corpus in bpb]
    vocab = transplant_report["vocab"]
    residual = transplant_report["sides"]["input"].get("relative_residual", {}).get("mean")
    residual = "n/a" if residual is None else f"{residual:.3f}"
    d, tr = cfg.data, cfg.train
    text = [
        f"# Heal: {cfg.base} onto {cfg.tokenizer}'s tokenizer",
        "",
        f"Transplant: method `{cfg.transplant.method}`: {vocab['shared']:,} shared tokens "
        f"copied, {vocab['approximated']:,} approximated (mean relative residual {residual}); "
        f"{transplant_report['timings']['total_s']:.0f} s.",
        f"Healing: {tr.max_steps} steps of {d.batch_size} x {d.max_length} tokens on "
        f"{d.corpus}, balance {cfg.balance}; arms: "
        + "; ".join(f"{n} ({', '.join(s.name for s in a.losses)}, lr "
                    f"{a.lr or cfg.optim.lr:g}, {a.trainable or cfg.models.trainable})"
                    for n, a in cfg.arms.items()) + ".",
        "",
        f"## Bits per byte (test split, first {cfg.eval.bytes:,} bytes; lower is better)",
        "",
        markdown_table(["corpus", *names, *(f"gap closed ({a})" for a in arms)], rows),
        "",
        "Agreement with the teacher (validation, mean |l_T - l_S| per chunk, nats): "
        + ", ".join(f"{a} {v:.3f}" for a, v in agreement.items()) + ".",
        "",
        "![bpb](bpb.png)",
        "",
        "![gap closed](gap_closed.png)",
        "",
        "![training curves](curves.png)",
        "",
        "## Greedy continuations",
        "",
    ]
    for i, prompt in enumerate(cfg.eval.prompts):
        text.append(f"**{prompt}**")
        text.extend(f"- {name}: `{continuations[name][i].strip()!r}`" for name in continuations)
        text.append("")
    path = out / "report.md"
    path.write_text("\n".join(text))
    shown = "\n".join(line for line in text if not line.startswith("!["))  # the plots: files
    console().print(re.sub(r"\n{3,}", "\n\n", shown), markup=False)
    console().print(f"\nreport: {path}\nplots: " + ", ".join(
        str(out / f) for f in ("bpb.png", "gap_closed.png", "curves.png")))
    return path
