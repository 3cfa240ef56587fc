"""Ensemble two model families on one tokenizer.

Gemma-3-270M is moved onto SmolLM2-135M's tokenizer (OMP transplant + a short ALM heal: the heal
recipe, reused), then the two are averaged next-token probability by next-token probability.
Reports bpb and gsm-symbolic accuracy of each member and of the ensemble.

    ctd ensemble-recipe --recipe configs/recipes/ensemble.yaml
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctd.config import free_keys
from ctd.corpora import load_corpus, load_texts
from ctd.ensemble import Mode, compare
from ctd.errors import CtdError
from ctd.io import Stages
from ctd.losses.objective import LossSpec
from ctd.recipes.heal import Arm, EvalConfig, HealConfig
from ctd.recipes.heal import run as heal
from ctd.report import console, markdown_table, plot_bars
from ctd.zoo import resolve_tokenizer


@dataclass
class EnsembleConfig:
    """The ensemble recipe. Args:
        partner: the model that already uses the shared tokenizer (it is also the OMP donor).
        heal: how the other model is moved and healed (its `tokenizer` must be `partner`); the
            healed model of its first arm is the member.
        moved: an already moved and healed model on the partner's tokenizer (e.g. the heal
            recipe's `alm+clm/model`); when given, the heal step is skipped.
        mode: average probabilities or logits.
        eval_bytes: bpb on this many bytes of wiki-en test; gsm_problems: gsm-symbolic test items.
    """

    partner: str = "smollm2-135m"
    heal: HealConfig = field(default_factory=lambda: HealConfig(
        arms={"alm+clm": Arm([LossSpec("alm"), LossSpec("clm")])},
        eval=EvalConfig(corpora=["wiki-en"]), out=Path("runs/ensemble/heal")))
    moved: Path | None = None
    mode: Mode = "probs"
    eval_bytes: int = 50_000
    gsm_problems: int = 50
    out: Path = Path("runs/ensemble")


def run(cfg: EnsembleConfig) -> Path:
    """Move and heal (unless `moved` is given), score members and ensemble, report."""
    if cfg.moved is None and resolve_tokenizer(cfg.heal.tokenizer) != resolve_tokenizer(cfg.partner):
        raise CtdError(f"the heal step moves {cfg.heal.base} onto {cfg.heal.tokenizer}, not onto "
                       f"the partner {cfg.partner}'s tokenizer; set heal.tokenizer to the partner")
    out = Path(cfg.out).expanduser().resolve()
    stages = Stages(out, asdict(cfg), free_keys(EnsembleConfig))

    # 1. Move the other family onto the partner's tokenizer and heal it (resumable).
    moved = cfg.moved
    if moved is None:
        heal(cfg.heal)
        moved = Path(cfg.heal.out).expanduser().resolve() / next(iter(cfg.heal.arms)) / "model"

    # 2. Score each member and the ensemble through the shared tokenizer.
    texts = load_texts("wiki-en", "test", cfg.eval_bytes)
    rows = load_corpus("gsm-symbolic", "test").select(range(cfg.gsm_problems)).to_list()
    shots = load_corpus("gsm-symbolic", "train").select(range(1)).to_list()
    results = stages.once("compare", compare, [cfg.partner, str(moved)], cfg.partner, texts,
                          cfg.mode, rows, shots)

    # 3. Report.
    label = f"{cfg.moved} (moved)" if cfg.moved else f"{cfg.heal.base} moved and healed"
    names = {cfg.partner: cfg.partner, str(moved): label}
    results = {names.get(k, k): v for k, v in results.items()}
    plot_bars({"wiki-en bpb": {n: r["bpb"] for n, r in results.items()}}, "bits per byte",
              out / "bpb.png")
    text = "\n".join([
        f"# Ensemble of {cfg.partner} and {label} on {cfg.partner}'s tokenizer",
        "",
        f"wiki-en test, first {cfg.eval_bytes:,} bytes; {cfg.gsm_problems} gsm-symbolic test "
        f"problems (1-shot, greedy); mode `{cfg.mode}`.",
        "",
        markdown_table(["model", "bpb", "gsm accuracy"],
                       [[n, r["bpb"], r.get("gsm_accuracy", float("nan"))]
                        for n, r in results.items()]),
        "",
        "![bpb](bpb.png)",
    ])
    (out / "report.md").write_text(text)
    console().print(text)
    return out / "report.md"
