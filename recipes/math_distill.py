"""Distill a math teacher into a small student of another family (different tokenizers).

Teacher Qwen2.5-Coder-0.5B-Instruct, student SmolLM2-135M-Instruct, data gsm-symbolic (the
question is masked, the worked solution is trained). Arms at equal steps and data, by default
ALM + SFT (the student matches the teacher's chunk likelihoods and the text) and SFT alone.
Scored by exact-match accuracy of greedy answers (the number after ####) on held-out problems.

    ctd math --recipe configs/recipes/math_distill.yaml

The config is a `ctd distill` config (models, data, optim, train, balance) plus the recipe's
arms and evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ctd.config import DataConfig, DistillConfig, ModelsConfig, OptimConfig, TrainConfig, free_keys
from ctd.corpora import load_corpus
from ctd.io import Stages
from ctd.losses.objective import Balance, LossSpec
from ctd.report import console, markdown_table, plot_bars, plot_curves
from ctd.zoo import load_model, load_tokenizer


@dataclass
class MathEval:
    """Held-out gsm-symbolic problems, worked examples shown before each, generation budget."""

    test_problems: int = 100
    shots: int = 1
    max_new_tokens: int = 200


def _default_arms() -> dict[str, list[LossSpec]]:
    return {"alm+sft": [LossSpec("alm"), LossSpec("clm")], "sft": [LossSpec("clm")]}


@dataclass
class MathConfig:
    """The math distillation recipe. Args:
        models: teacher and student (different tokenizers are fine), what of the student trains.
        data, balance, optim, train: each arm's training run, as in `ctd distill`.
        arms: name -> losses.
        eval: held-out problems, shots, generation budget.
        out: recipe directory (a second run continues it).
    """

    models: ModelsConfig = field(default_factory=lambda: ModelsConfig(
        teacher="qwen2.5-coder-0.5b", student="smollm2-135m"))
    data: DataConfig = field(default_factory=lambda: DataConfig(
        corpus="gsm-symbolic", max_length=320, batch_size=8, val_documents=16))
    balance: Balance = "grad_norm"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, checkpoint_every=50, val_every=100))
    arms: dict[str, list[LossSpec]] = field(default_factory=_default_arms)
    eval: MathEval = field(default_factory=MathEval)
    out: Path = Path("runs/math")


def _train(cfg: MathConfig, losses: list[LossSpec], out: Path) -> dict:
    from ctd.train import distill_step  # Lightning: imported when training, not by the CLI

    return distill_step(DistillConfig(cfg.models, cfg.data, losses, cfg.balance, cfg.optim,
                                      cfg.train), out)


def _accuracy(model: str, test: list[dict], shots: list[dict], max_new_tokens: int) -> dict:
    from ctd.evaluate import gsm_accuracy  # not at the top: see recipes/heal.py's _bpb

    return gsm_accuracy(load_model(model), load_tokenizer(model), test, shots, max_new_tokens)


def run(cfg: MathConfig) -> Path:
    """Train every arm, score teacher / student before / each arm; returns the report path."""
    out = Path(cfg.out).expanduser().resolve()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    stages = Stages(out, asdict(cfg), free_keys(MathConfig))

    # 1. The arms at equal steps and data.
    for name, losses in cfg.arms.items():
        stages.once(f"train-{name}", _train, cfg, losses, out / name)

    # 2. Exact-match accuracy on held-out problems, the same shots for every model.
    e = cfg.eval
    test = load_corpus("gsm-symbolic", "test").select(range(e.test_problems)).to_list()
    shots = load_corpus("gsm-symbolic", "train").select(range(e.shots)).to_list()
    models = {"teacher": cfg.models.teacher, "student (before)": cfg.models.student}
    models |= {f"student ({name})": str(out / name / "model") for name in cfg.arms}
    scores = {
        name: stages.once(f"gsm-{name.replace(' ', '_')}", _accuracy, model, test, shots,
                          e.max_new_tokens)
        for name, model in models.items()
    }

    # 3. Report.
    plot_bars({"gsm-symbolic test": {n: s["accuracy"] for n, s in scores.items()}},
              "exact-match accuracy", out / "accuracy.png")
    plot_curves({n: out / n for n in cfg.arms}, ["train/clm", "train/alm",
                                                              "val/bpb"], out / "curves.png")
    rows = [[n, s["accuracy"], f"{s['correct']}/{s['n']}"] for n, s in scores.items()]
    d = cfg.data
    text = "\n".join([
        f"# Math distillation: {cfg.models.teacher} -> {cfg.models.student}",
        "",
        f"{cfg.train.max_steps} steps per arm, batch {d.batch_size} x {d.max_length}, lr "
        f"{cfg.optim.lr}; {e.test_problems} held-out gsm-symbolic problems, {e.shots}-shot, "
        "greedy.",
        "",
        markdown_table(["model", "accuracy", "correct"], rows),
        "",
        "![accuracy](accuracy.png)",
        "",
        "![curves](curves.png)",
    ])
    (out / "report.md").write_text(text)
    console().print(text)
    return out / "report.md"

