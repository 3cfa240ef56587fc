"""Heal a transplant: move a model onto another tokenizer with OMP, then repair it with ALM
self-distillation (teacher = the original model with its own tokenizer), and compare with
CLM-only healing at the same steps and data.

    ctd heal --recipe configs/recipes/heal.yaml          # the full recipe
    ctd demo                                             # the same at demo scale (~20 min CPU)

Every step stores its result under `out/` when it finishes; running the recipe again continues
from what is done (transplant, last training checkpoint, evaluations) and rewrites the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ctd.config import DataConfig, ModelsConfig, OptimConfig, Trainable, TrainConfig
from ctd.corpora import load_texts
from ctd.evaluate import bits_per_byte, greedy_generate
from ctd.io import Stages
from ctd.losses.objective import LossSpec
from ctd.report import console, markdown_table, plot_bars, plot_curves
from ctd.transplant.run import transplant
from ctd.zoo import load_model, load_tokenizer

PROMPTS = ["The capital of France is", "Water is made of", "def fibonacci(n):",
           "The first man on the Moon was"]


@dataclass
class HealConfig:
    """The heal recipe. Args:
        base: the model to move (its body is kept).
        tokenizer: the tokenizer to move it onto (a model name makes that model the OMP donor).
        method, k: transplant method and OMP sparsity.
        steps, batch_size, max_length, lr, warmup: healing run (each arm gets the same).
        train_documents: training documents of wiki-en (None = all).
        eval_corpora, eval_bytes: bpb on the first `eval_bytes` of each corpus's test split.
        balance: how ALM and CLM are weighted: "grad_norm" (each term moves the last hidden
            state equally; ALM's gradients are ~tau times smaller, so fixed weights let CLM
            dominate) or "fixed".
        compare_clm: also heal with CLM only, for comparison.
        train: what the heal trains: "all" weights, only the "embeddings" (input and output;
            the body that the transplant kept stays as it was), or "lora" adapters.
        threads: torch threads (None = torch's default).
        out: recipe directory (never deleted; a second run continues it).
    """

    base: str = "gemma3-270m"
    tokenizer: str = "smollm2-135m"
    method: str = "omp"
    k: int = 64
    steps: int = 300
    batch_size: int = 8
    max_length: int = 256
    lr: float = 1e-5
    warmup: int = 20
    train_documents: int | None = None
    val_documents: int = 32
    eval_corpora: list[str] = field(default_factory=lambda: ["wiki-en", "python-docs"])
    eval_bytes: int = 100_000
    balance: str = "grad_norm"
    compare_clm: bool = True
    train: Trainable = "all"
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    threads: int | None = None
    out: Path = Path("runs/heal")


def demo_config(out: Path = Path("runs/demo")) -> HealConfig:
    """The heal recipe at a scale a 2-core CPU finishes in about 20 minutes."""
    from ctd.corpora import _PYTHON_DOCS

    corpora = ["wiki-en"] + (["python-docs"] if _PYTHON_DOCS.is_dir() else [])
    return HealConfig(steps=40, batch_size=4, max_length=128, lr=1e-5, warmup=4,
                      train_documents=2000, val_documents=16, eval_corpora=corpora,
                      eval_bytes=10_000, prompts=PROMPTS[:2], out=out)


def heal_arm(cfg: HealConfig, student: Path, losses: list[LossSpec], out: Path) -> dict:
    """One healing arm; continues its last checkpoint if an earlier run was interrupted."""
    from ctd.train import distill_step  # Lightning: imported when training, not by the CLI

    return distill_step(
        ModelsConfig(teacher=cfg.base, student=str(student), teacher_dtype="float32",
                     trainable=cfg.train),
        DataConfig(corpus="wiki-en", max_length=cfg.max_length, batch_size=cfg.batch_size,
                   max_documents=cfg.train_documents, val_documents=cfg.val_documents),
        losses, cfg.balance,
        OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup),
        TrainConfig(max_steps=cfg.steps, checkpoint_every=max(cfg.steps // 4, 1),
                    val_every=max(cfg.steps // 4, 1), threads=cfg.threads),
        out,
    )


def _bpb(model, tokenizer, texts: list[str]) -> dict:
    return bits_per_byte(load_model(model), load_tokenizer(tokenizer), texts).as_dict()


def _continue(model, tokenizer, prompts: list[str]) -> list[str]:
    return greedy_generate(load_model(model), load_tokenizer(tokenizer), prompts,
                           max_new_tokens=24, progress=False)


def run(cfg: HealConfig) -> Path:
    """Transplant, heal (ALM+CLM, and CLM only), evaluate, report. Returns the report path."""
    out = Path(cfg.out).expanduser().resolve()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stages = Stages(out, asdict(cfg))

    # 1. Transplant the base onto the new tokenizer (training-free).
    transplanted = out / "transplant"
    report = stages.once("transplant", transplant, cfg.base, cfg.tokenizer, transplanted,
                         method=cfg.method, k=cfg.k, overwrite=True)

    # 2. Heal: ALM self-distillation + CLM (the recommended recipe), and CLM alone.
    arms = {"healed-alm": [LossSpec("alm"), LossSpec("clm")]}
    if cfg.compare_clm:
        arms["healed-clm"] = [LossSpec("clm")]
    for name, losses in arms.items():
        stages.once(name, heal_arm, cfg, transplanted, losses, out / name)

    # 3. Bits per byte on held-out text of every corpus (tokenizer independent).
    models = {"original": (cfg.base, cfg.base), "transplanted": (transplanted, transplanted)}
    models |= {name: (out / name / "model",) * 2 for name in arms}
    bpb: dict[str, dict[str, float]] = {}
    for corpus in cfg.eval_corpora:
        texts = load_texts(corpus, "test", cfg.eval_bytes)
        for name, (model, tok) in models.items():
            result = stages.once(f"bpb-{corpus}-{name}", _bpb, model, tok, texts)
            bpb.setdefault(corpus, {})[name] = result["bpb"]

    # 4. Greedy continuations of fixed prompts.
    continuations = {
        name: stages.once(f"continue-{name}", _continue, model, tok, cfg.prompts)
        for name, (model, tok) in models.items()
    }
    return write_report(cfg, out, report, bpb, continuations, list(arms))


def gap_closed(bpb: dict[str, float], arm: str) -> float:
    """Fraction of the transplant's bpb gap to the original that healing recovered."""
    gap = bpb["transplanted"] - bpb["original"]
    return (bpb["transplanted"] - bpb[arm]) / gap if gap else float("nan")


def write_report(cfg: HealConfig, out: Path, transplant_report: dict, bpb: dict,
                 continuations: dict, arms: list[str]) -> Path:
    """report.md with the numbers, plus bpb.png and curves.png."""
    plot_bars(bpb, "bits per byte (lower is better)", out / "bpb.png")
    logs = {arm: out / arm / "logs" / "version_0" / "metrics.csv" for arm in arms}
    plot_curves({a: p for a, p in logs.items() if p.exists()},
                ["train/clm", "train/alm", "val/bpb"], out / "curves.png")
    names = list(next(iter(bpb.values())))
    rows = [[corpus, *(bpb[corpus][n] for n in names),
             *(f"{gap_closed(bpb[corpus], a):.0%}" for a in arms)] for corpus in bpb]
    vocab = transplant_report["vocab"]
    residual = transplant_report["sides"]["input"].get("relative_residual", {}).get("mean")
    residual = "n/a" if residual is None else f"{residual:.3f}"
    text = [
        f"# Heal: {cfg.base} onto {cfg.tokenizer}'s tokenizer",
        "",
        f"Transplant: method `{cfg.method}` (k={cfg.k}): {vocab['shared']:,} shared tokens copied, "
        f"{vocab['approximated']:,} approximated (mean relative OMP residual {residual}); "
        f"{transplant_report['timings']['total_s']:.0f} s.",
        f"Healing: {cfg.steps} steps, batch {cfg.batch_size} x {cfg.max_length} tokens, lr "
        f"{cfg.lr}, wiki-en train; arms: {', '.join(arms)}.",
        "",
        f"## Bits per byte (test split, first {cfg.eval_bytes:,} bytes; lower is better)",
        "",
        markdown_table(["corpus", *names, *(f"gap closed ({a})" for a in arms)], rows),
        "",
        "![bpb](bpb.png)",
        "",
        "![training curves](curves.png)",
        "",
        "## Greedy continuations",
        "",
    ]
    for i, prompt in enumerate(cfg.prompts):
        text.append(f"**{prompt}**")
        text.extend(f"- {name}: `{continuations[name][i].strip()!r}`" for name in continuations)
        text.append("")
    path = out / "report.md"
    path.write_text("\n".join(text))
    console().print("\n".join(text[:14]))
    console().print(f"\nreport: {path}\nplots: {out / 'bpb.png'}, {out / 'curves.png'}")
    return path
