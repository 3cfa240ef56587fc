"""Distill a math teacher into a small student of another family (different tokenizers).

Teacher Qwen2.5-Coder-0.5B-Instruct, student SmolLM2-135M-Instruct, data gsm-symbolic (the
question is masked, the worked solution is trained). Two arms at equal steps and data: ALM + SFT
(the student matches the teacher's chunk likelihoods and the text) and SFT alone. Scored by
exact-match accuracy of greedy answers (the number after ####) on held-out problems.

    ctd math --recipe configs/recipes/math_distill.yaml
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctd.config import DataConfig, ModelsConfig, OptimConfig, TrainConfig
from ctd.corpora import load_corpus
from ctd.evaluate import gsm_accuracy
from ctd.io import Stages
from ctd.losses.objective import LossSpec
from ctd.report import console, markdown_table, plot_bars, plot_curves
from ctd.zoo import load_model, load_tokenizer


@dataclass
class MathConfig:
    """The math distillation recipe. Args:
        teacher, student: zoo names, HF directories or hub ids (different tokenizers are fine).
        steps, batch_size, max_length, lr, warmup: each arm's training run.
        train_problems: gsm-symbolic training problems used (None = all 4,000).
        test_problems: held-out problems scored; shots: worked examples shown before each.
        max_new_tokens: generation budget per answer.
        out: recipe directory (a second run continues it).
    """

    teacher: str = "qwen2.5-coder-0.5b"
    student: str = "smollm2-135m"
    steps: int = 200
    batch_size: int = 8
    max_length: int = 320
    lr: float = 2e-5
    warmup: int = 10
    train_problems: int | None = None
    test_problems: int = 100
    shots: int = 1
    max_new_tokens: int = 200
    balance: str = "grad_norm"
    threads: int | None = None
    out: Path = Path("runs/math")


def _train(cfg: MathConfig, losses: list[LossSpec], out: Path) -> dict:
    from ctd.train import distill_step  # Lightning: imported when training, not by the CLI

    return distill_step(
        ModelsConfig(teacher=cfg.teacher, student=cfg.student),
        DataConfig(corpus="gsm-symbolic", max_length=cfg.max_length, batch_size=cfg.batch_size,
                   max_documents=cfg.train_problems, val_documents=16),
        losses, cfg.balance,
        OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup),
        TrainConfig(max_steps=cfg.steps, checkpoint_every=max(cfg.steps // 4, 1),
                    val_every=max(cfg.steps // 2, 1), threads=cfg.threads),
        out,
    )


def _accuracy(model: str, test: list[dict], shots: list[dict], max_new_tokens: int) -> dict:
    return gsm_accuracy(load_model(model), load_tokenizer(model), test, shots, max_new_tokens)


def run(cfg: MathConfig) -> Path:
    """Train both arms, score teacher / student before / both arms; returns the report path."""
    out = Path(cfg.out).expanduser().resolve()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stages = Stages(out, asdict(cfg))

    # 1. Two arms at equal steps and data: ALM + SFT, and SFT alone.
    arms = {"alm+sft": [LossSpec("alm"), LossSpec("clm")], "sft": [LossSpec("clm")]}
    for name, losses in arms.items():
        stages.once(f"train-{name}", _train, cfg, losses, out / name)

    # 2. Exact-match accuracy on held-out problems, the same shots for every model.
    test = load_corpus("gsm-symbolic", "test").select(range(cfg.test_problems)).to_list()
    shots = load_corpus("gsm-symbolic", "train").select(range(cfg.shots)).to_list()
    models = {"teacher": cfg.teacher, "student (before)": cfg.student}
    models |= {f"student ({name})": str(out / name / "model") for name in arms}
    scores = {
        name: stages.once(f"gsm-{name.replace(' ', '_')}", _accuracy, model, test, shots,
                          cfg.max_new_tokens)
        for name, model in models.items()
    }

    # 3. Report.
    plot_bars({"gsm-symbolic test": {n: s["accuracy"] for n, s in scores.items()}},
              "exact-match accuracy", out / "accuracy.png")
    plot_curves({n: out / n / "logs" / "version_0" / "metrics.csv" for n in arms},
                ["train/clm", "train/alm"], out / "curves.png")
    rows = [[n, s["accuracy"], f"{s['correct']}/{s['n']}"] for n, s in scores.items()]
    text = "\n".join([
        f"# Math distillation: {cfg.teacher} -> {cfg.student}",
        "",
        f"{cfg.steps} steps per arm, batch {cfg.batch_size} x {cfg.max_length}, lr {cfg.lr}; "
        f"{cfg.test_problems} held-out gsm-symbolic problems, {cfg.shots}-shot, greedy.",
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
