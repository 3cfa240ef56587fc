"""The distillation trainer end to end on tiny models over REAL, different tokenizers:
loss goes down, export reloads, resume is exact, bad input is refused in one line."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from transformers import AutoModelForCausalLM

from ctd.cli import main
from ctd.config import DataConfig
from ctd.data import DistillData
from ctd.errors import CtdError
from ctd.losses.logprobs import hidden_states, output_head
from ctd.losses.objective import DistillObjective, LossSpec
from ctd.report import run_curves
from ctd.train import AtomicCheckpointIO, distill
from tests.tiny import distill_config


class Record(pl.Callback):
    """Per optimizer step: the logged loss parts; optionally raises SIGINT after a step."""

    def __init__(self, interrupt_at: int | None = None):
        self.steps: list[dict] = []
        self.interrupt_at = interrupt_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.steps.append({k: float(v) for k, v in m.items()
                           if k.startswith("train/") and "_per_sec" not in k})
        if trainer.global_step == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)


def test_alm_goes_down_and_export_reloads(zoo_dir, tmp_path):
    rec = Record()
    cfg = distill_config(zoo_dir, max_steps=10, val_every=5)
    cfg.losses = [LossSpec("alm")]
    cfg.data.max_documents = 8  # two batches, seen again and again: learnable
    cfg.data.batch_size = 4
    summary = distill(cfg, out=tmp_path / "run", callbacks=(rec,))
    alm = [s["train/alm"] for s in rec.steps]
    assert summary["steps"] == 10 and not summary["interrupted"]
    assert sum(alm[-2:]) < 0.7 * sum(alm[:2]), alm
    model = AutoModelForCausalLM.from_pretrained(summary["export"])
    assert model.config.vocab_size == tiny_model_vocab(zoo_dir)
    assert (tmp_path / "run" / "config.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    for key in ("val/bpb", "val/teacher_bpb", "val/agreement", "train/device/items_per_sec",
                "train/chunks"):
        assert run_curves(tmp_path / "run", key), key


def tiny_model_vocab(root: Path) -> int:
    return AutoModelForCausalLM.from_pretrained(root / "student").config.vocab_size


def test_identical_teacher_and_student_give_zero_alm(zoo_dir, smol_tok):
    cfg = DataConfig(corpus=str(zoo_dir / "corpus.txt"), max_length=48, batch_size=4,
                     max_documents=8)
    dm = DistillData(smol_tok, smol_tok, cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "student")
    objective = DistillObjective([LossSpec("alm")], smol_tok, smol_tok)
    with torch.no_grad():
        h = hidden_states(model, batch["student_input_ids"], batch["student_attention_mask"])
        parts = objective(batch, h, output_head(model), h, output_head(model),
                          int(batch["global_chunks"]), int(batch["global_tokens"]))
    assert abs(float(parts["alm"])) < 1e-6


def test_resume_is_exact(zoo_dir, tmp_path):
    whole = Record()
    distill(distill_config(zoo_dir), out=tmp_path / "whole", callbacks=(whole,))
    first = Record(interrupt_at=2)
    out = tmp_path / "split"
    summary = distill(distill_config(zoo_dir), out=out, callbacks=(first,))
    assert summary["interrupted"] and summary["steps"] == 2 and summary["export"] is None
    second = Record()
    summary = distill(distill_config(zoo_dir), out=out, resume=True, callbacks=(second,))
    assert summary["steps"] == 4 and summary["export"] is not None
    assert len(first.steps) == 2 and len(second.steps) == 2
    for a, b in zip(whole.steps, first.steps + second.steps, strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, whole.steps, first.steps,
                                                                      second.steps)


def test_dataloader_workers_train_what_one_process_trains(zoo_dir, tmp_path):
    """`data.num_workers` forks DataLoader workers after the tokenize-and-align pass ran the
    tokenizers' threads in this process: the same batches, so the same losses."""
    steps = {}
    for workers in (0, 1):
        rec = Record()
        cfg = distill_config(zoo_dir, max_steps=3)
        cfg.data.num_workers = workers
        distill(cfg, out=tmp_path / f"w{workers}", callbacks=(rec,))
        steps[workers] = rec.steps
    assert len(steps[1]) == 3
    for a, b in zip(steps[0], steps[1], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("steps,every,writes", [(2, 100, 1), (3, 2, 2), (4, 2, 2)])
def test_each_checkpoint_is_written_once(zoo_dir, tmp_path, monkeypatch, steps, every, writes):
    """last.ckpt is written every `checkpoint_every` steps and once at the end, never twice for
    one step (a checkpoint holds the student and its optimizer: seconds per write)."""
    saved = []
    write = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", lambda self, ckpt, path, *a, **k: (
        saved.append(ckpt["global_step"]), write(self, ckpt, path, *a, **k)))
    distill(distill_config(zoo_dir, max_steps=steps, checkpoint_every=every), out=tmp_path / "r")
    assert len(saved) == writes and len(set(saved)) == writes and saved[-1] == steps, saved
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").exists()


def test_a_resumed_run_writes_its_last_checkpoint_once(zoo_dir, tmp_path, monkeypatch):
    """Resumed after an interrupt at step 2, a run ending at step 4 before its next periodic
    save writes last.ckpt once (Lightning restores where the last one is, not that this run has
    saved nothing yet)."""
    saved = []
    write = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", lambda self, ckpt, path, *a, **k: (
        saved.append(ckpt["global_step"]), write(self, ckpt, path, *a, **k)))
    cfg = distill_config(zoo_dir, max_steps=4, checkpoint_every=100)
    distill(cfg, out=tmp_path / "r", callbacks=(Record(interrupt_at=2),))
    assert saved == [2]
    distill(cfg, out=tmp_path / "r", resume=True)
    assert saved == [2, 4]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_steps_and_gradients_are_clipped(zoo_dir, tmp_path, monkeypatch, precision):
    """The optimizer is AdamW fused into one kernel, and Lightning still clips every step's
    gradients before it (its mixed-precision plugin refuses to clip for an optimizer that says
    it unscales gradients itself)."""
    clipped, steps = [], []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **k: (clipped.append(max_norm),
                                                           clip(params, max_norm, *a, **k))[1])

    class Fused(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(optimizer.defaults["fused"])

    cfg = distill_config(zoo_dir, max_steps=2, precision=precision)
    cfg.optim.grad_clip = 0.5
    distill(cfg, out=tmp_path / "run", callbacks=(Fused(),))
    assert steps == [True, True] and clipped == [0.5, 0.5]


def test_resume_with_another_config_is_refused(zoo_dir, tmp_path):
    out = tmp_path / "run"
    distill(distill_config(zoo_dir, max_steps=1), out=out)
    ckpt = out / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    cfg = distill_config(zoo_dir, max_steps=1)
    cfg.optim.lr = 1.0
    with pytest.raises(CtdError, match="different config.*optim.lr"):
        distill(cfg, out=out, resume=True)
    with pytest.raises(CtdError, match="not empty"):
        distill(distill_config(zoo_dir, max_steps=1), out=out)
    assert ckpt.stat().st_mtime_ns == before


def _cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["distill", *args])
    return e.value.code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_exit_2(zoo_dir, tmp_path, smol_tok, capsys):
    from tokenizers import normalizers

    base = ["--models.teacher", str(zoo_dir / "teacher"), "--models.student",
            str(zoo_dir / "student"), "--data.corpus", str(zoo_dir / "corpus.txt"),
            "--losses", "[{name: alm}]", "--train.max_steps", "1", "--out", str(tmp_path / "o")]
    code, err = _cli([*base, "--losses", "[{name: nope}]"], capsys)
    assert code == 2 and "unknown loss 'nope'" in err and "\n" not in err
    code, err = _cli([*base, "--data.corpus", "no-such-corpus"], capsys)
    assert code == 2 and "unknown corpus 'no-such-corpus'" in err and "\n" not in err
    lower = smol_tok.__class__.from_pretrained(zoo_dir / "student")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    lower.save_pretrained(tmp_path / "lower")
    code, err = _cli([*base, "--models.teacher_tokenizer", str(tmp_path / "lower")], capsys)
    assert code == 2 and "Lowercase" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_embeddings_only_training_keeps_the_body(zoo_dir, tmp_path):
    """train='embeddings' (how a transplant can be healed without touching the body it kept):
    the exported model differs from the start only in its embedding matrices."""
    from safetensors.torch import load_file

    cfg = distill_config(zoo_dir, max_steps=2)
    cfg.models.trainable = "embeddings"
    summary = distill(cfg, out=tmp_path / "run")
    before = load_file(zoo_dir / "student" / "model.safetensors")
    after = load_file(Path(summary["export"]) / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("embed" in k or "lm_head" in k for k in changed), changed


def test_lora_trains_the_embeddings_and_merges_into_the_export(zoo_dir, tmp_path):
    """trainable=lora (how the ALM reference heals a transplant): adapters on every linear layer
    plus trainable embeddings; the export is a plain model with the adapters merged in."""
    from safetensors.torch import load_file

    cfg = distill_config(zoo_dir, max_steps=2)
    cfg.models.trainable, cfg.models.lora_rank = "lora", 4
    summary = distill(cfg, out=tmp_path / "run")
    before = load_file(zoo_dir / "student" / "model.safetensors")
    after = load_file(Path(summary["export"]) / "model.safetensors")
    assert before.keys() == after.keys()  # no adapter tensors left: merged
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("embed" in k for k in changed)  # the embeddings trained
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)  # merged
    assert not any("norm" in k for k in changed)  # what LoRA does not touch stays


def test_validation_and_ctd_eval_compute_one_bits_per_byte(zoo_dir, smol_tok):
    """Validation's bpb (ctd distill) and ctd eval's are one computation: on the same texts
    cut into the same windows they give the same number."""
    from ctd.evaluate import bits_per_byte
    from ctd.train import Distiller

    cfg = DataConfig(corpus=str(zoo_dir / "corpus.txt"), max_length=512, val_documents=12,
                     val_batch_size=5)
    dm = DistillData(smol_tok, smol_tok, cfg)  # one tokenizer: windows are eval's windows
    dm.setup("fit")
    texts = dm.corpora()["validation"]["text"]
    student = AutoModelForCausalLM.from_pretrained(zoo_dir / "student")
    want = bits_per_byte(student, smol_tok, texts, window=512, progress=False).bpb
    module = Distiller(student, None, DistillObjective([LossSpec("clm")], smol_tok, smol_tok),
                       distill_config(zoo_dir).optim)
    (got,) = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(module, datamodule=dm, verbose=False)
    assert got["val/bpb"] == pytest.approx(want, rel=1e-5)


def test_export_carries_a_model_card(zoo_dir, tmp_path):
    from ctd.card import read_front_matter

    summary = distill(distill_config(zoo_dir, max_steps=1), out=tmp_path / "run")
    meta = read_front_matter(summary["export"])
    assert meta["pipeline_tag"] == "text-generation" and "distill" in meta["tags"]
    card = (Path(summary["export"]) / "README.md").read_text()
    assert f"ctd distill --config {tmp_path / 'run' / 'config.json'}" in card
    assert "- steps: 1" in card and "- losses: alm, clm" in card
