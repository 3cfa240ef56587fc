"""The heal recipe end to end on tiny models over real tokenizers: transplant, two healing arms,
bpb, continuations, report and plots; a second run continues from what is done."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctd.config import DataConfig, OptimConfig, TrainConfig
from ctd.errors import CtdError
from ctd.recipes.heal import EvalConfig, HealConfig, TransplantConfig, gap_closed, run
from tests.tiny import tiny_model


def tiny_heal(base, donor, out, steps: int = 2, **kw) -> HealConfig:
    """The heal recipe at the smallest scale that runs every step."""
    return HealConfig(
        base=str(base), tokenizer=str(donor), transplant=TransplantConfig(k=8),
        data=DataConfig(corpus="wiki-en", max_length=32, batch_size=2, max_documents=16,
                        val_documents=2),
        optim=OptimConfig(lr=1e-3), train=TrainConfig(max_steps=steps, checkpoint_every=1,
                                                      val_every=1, progress=False,
                                                      precision="32-true"),
        eval=EvalConfig(corpora=["wiki-en"], bytes=400, prompts=["Paris is"]), out=out, **kw)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, gemma_tok, smol_tok):
    root = tmp_path_factory.mktemp("pair")
    for name, tok, arch in (("base", gemma_tok, "gemma3"), ("donor", smol_tok, "llama")):
        tiny_model(tok, arch, seed=len(name)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "base", root / "donor"


def test_heal_recipe_runs_end_to_end_and_continues(tiny_pair, tmp_path, smol_tok):
    base, donor = tiny_pair
    cfg = tiny_heal(base, donor, tmp_path / "heal")
    report = run(cfg)
    text = report.read_text()
    assert "gap closed (alm+clm)" in text and "gap closed (clm)" in text
    assert "Agreement with the teacher" in text
    assert (tmp_path / "heal" / "bpb.png").stat().st_size > 0
    assert (tmp_path / "heal" / "curves.png").stat().st_size > 0
    assert (tmp_path / "heal" / "gap_closed.png").stat().st_size > 0
    stages = tmp_path / "heal" / "stages"
    bpb = {n: json.loads((stages / f"bpb-wiki-en-{n}.json").read_text())
           for n in ("original", "transplanted", "alm+clm", "clm")}
    assert len({b["bytes"] for b in bpb.values()}) == 1  # every model charged for the same bytes
    moved = json.loads((tmp_path / "heal" / "transplant" / "config.json").read_text())
    assert moved["vocab_size"] == len(smol_tok)  # really moved onto the other tokenizer
    stamps = {p.name: p.stat().st_mtime_ns for p in stages.iterdir()}
    assert run(cfg) == report  # a second run redoes nothing and rewrites the report
    assert {p.name: p.stat().st_mtime_ns for p in stages.iterdir()} == stamps
    with pytest.raises(CtdError, match="different config .*train.max_steps"):
        run(tiny_heal(base, donor, tmp_path / "heal", steps=3))  # 2-step results as 3-step ones
    assert {p.name: p.stat().st_mtime_ns for p in stages.iterdir()} == stamps


def test_gap_closed():
    assert gap_closed({"original": 1.0, "transplanted": 2.0, "healed": 1.25}, "healed") == 0.75


def test_math_recipe_runs_end_to_end_and_continues(tiny_pair, tmp_path):
    from ctd.config import ModelsConfig
    from ctd.recipes.math_distill import MathConfig, MathEval
    from ctd.recipes.math_distill import run as run_math

    teacher, student = tiny_pair  # different tokenizers (Gemma-3's, SmolLM2's)
    cfg = MathConfig(models=ModelsConfig(teacher=str(teacher), student=str(student)),
                     data=DataConfig(corpus="gsm-symbolic", max_length=160, batch_size=2,
                                     max_documents=8, val_documents=2),
                     optim=OptimConfig(lr=1e-3),
                     train=TrainConfig(max_steps=2, checkpoint_every=1, val_every=1,
                                       progress=False, precision="32-true"),
                     eval=MathEval(test_problems=2, max_new_tokens=4), out=tmp_path / "math")
    report = run_math(cfg)
    text = report.read_text()
    for name in ("teacher", "student (before)", "student (alm+sft)", "student (sft)"):
        assert f"| {name} |" in text
    assert (tmp_path / "math" / "accuracy.png").stat().st_size > 0
    for arm in ("alm+sft", "sft"):  # both arms trained the same steps and wrote a model
        assert (tmp_path / "math" / arm / "model" / "config.json").exists()
    stages = tmp_path / "math" / "stages"
    stamps = {p.name: p.stat().st_mtime_ns for p in stages.iterdir()}
    assert run_math(cfg) == report and {
        p.name: p.stat().st_mtime_ns for p in stages.iterdir()} == stamps


def test_ensemble_recipe_moves_heals_and_ensembles(tiny_pair, tmp_path):
    from ctd.losses.objective import LossSpec
    from ctd.recipes.ensemble import EnsembleConfig
    from ctd.recipes.ensemble import run as run_ensemble
    from ctd.recipes.heal import Arm

    base, partner = tiny_pair
    heal = tiny_heal(base, partner, tmp_path / "ens" / "heal",
                     arms={"alm+clm": Arm([LossSpec("alm"), LossSpec("clm")])})
    cfg = EnsembleConfig(partner=str(partner), heal=heal, eval_bytes=400, gsm_problems=1,
                         out=tmp_path / "ens")
    text = run_ensemble(cfg).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "bpb" not in line]
    assert len(rows) == 3 and "ensemble (probs)" in rows[2]  # two members and the ensemble
    moved = json.loads((tmp_path / "ens" / "heal" / "alm+clm" / "model" / "config.json")
                       .read_text())
    assert moved["vocab_size"] == json.loads((partner / "config.json").read_text())["vocab_size"]
    with pytest.raises(CtdError, match="partner"):  # healed onto another tokenizer: refused
        run_ensemble(dataclasses.replace(cfg, heal=dataclasses.replace(heal, tokenizer=str(base)),
                                         out=tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_interrupted_recipe_continues_from_its_last_checkpoint(tiny_pair, tmp_path, monkeypatch):
    import signal

    import pytorch_lightning as pl

    import ctd.train

    class InterruptAfterFirstStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1:
                signal.raise_signal(signal.SIGINT)  # what Ctrl-C does

    from ctd.losses.objective import LossSpec
    from ctd.recipes.heal import Arm

    base, donor = tiny_pair
    cfg = tiny_heal(base, donor, tmp_path / "heal", steps=3,
                    arms={"alm+clm": Arm([LossSpec("alm"), LossSpec("clm")])})
    distill = ctd.train.distill
    monkeypatch.setattr(ctd.train, "distill", lambda *a, **kw: distill(
        *a, **kw, callbacks=(InterruptAfterFirstStep(),)))
    with pytest.raises(KeyboardInterrupt, match="run the recipe again"):
        run(cfg)
    arm = tmp_path / "heal" / "alm+clm"
    assert (arm / "checkpoints" / "last.ckpt").exists() and not (arm / "model").exists()
    transplanted = (tmp_path / "heal" / "transplant" / "model.safetensors").stat().st_mtime_ns
    resumed = []
    monkeypatch.setattr(ctd.train, "distill", lambda *a, **kw: resumed.append(kw["resume"]) or
                        distill(*a, **kw))
    run(cfg)  # continues: the transplant is kept, training resumes from step 1 and finishes
    assert resumed == [True]
    summary = json.loads((tmp_path / "heal" / "stages" / "arm-alm+clm.json").read_text())
    assert summary["steps"] == 3 and summary["export"]
    assert (tmp_path / "heal" / "transplant" / "model.safetensors").stat().st_mtime_ns == transplanted


ROOT = Path(__file__).resolve().parents[1]


def _until_exit(capsys, *args: str) -> tuple[int | None, str, str]:
    """Run the CLI until it exits: (status, stdout, stderr)."""
    from ctd.cli import main

    with pytest.raises(SystemExit) as exit:
        main(list(args))
    captured = capsys.readouterr()
    return exit.value.code, captured.out, captured.err


@pytest.mark.parametrize("verb,flag,path", [
    ("distill", "--config", "configs/heal.yaml"),
    ("distill", "--config", "configs/heal-smoke.yaml"),
    ("distill", "--config", "configs/heal-deepspeed.yaml"),
    ("teacher-cache", "--config", "configs/heal-smoke.yaml"),
    ("heal", "--recipe", "configs/recipes/heal.yaml"),
    ("math", "--recipe", "configs/recipes/math_distill.yaml"),
    ("ensemble-recipe", "--recipe", "configs/recipes/ensemble.yaml"),
])
def test_shipped_configs_parse(verb, flag, path, capsys):
    """Every config the repository ships parses into its verb's config (a renamed key or a
    misspelt loss fails here, not after a user's transplant)."""
    code, printed, _ = _until_exit(capsys, verb, flag, str(ROOT / path), "--print_config")
    assert code in (0, None)
    assert printed.strip() and "error" not in printed.lower()


@pytest.mark.parametrize("flag,value,message", [
    ("--data.batch_size", "0", "data.batch_size must be at least 1 (got 0)"),
    ("--data.max_length", "-5", "data.max_length must be at least 1 (got -5)"),
    ("--train.max_steps", "0", "train.max_steps must be at least 1 (got 0)"),
    ("--train.accumulate", "0", "train.accumulate must be at least 1 (got 0)"),
    ("--optim.lr", "-1", "optim.lr must be at least 0 (got -1.0)"),
])
def test_settings_out_of_range_are_one_line_errors(flag, value, message, capsys):
    """A zero batch or step count is refused by name when the config is read, not as a
    division by zero inside the trainer."""
    code, _, err = _until_exit(capsys, "distill", "--config",
                               str(ROOT / "configs/heal-smoke.yaml"), flag, value)
    assert code == 2 and err.strip() == f"ctd: error: {message}"


def test_cli_start_up_imports_no_training_stack():
    """Every verb builds its parser from all verbs' configs, recipes included: that must not
    import torchmetrics or Lightning (1.6 s and more before `ctd transplant` or `--help` starts)."""
    code = ("import sys, ctd.cli; print(sorted(m for m in ('torchmetrics', 'lightning', "
            "'pytorch_lightning', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
