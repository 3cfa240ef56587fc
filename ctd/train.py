"""The LightningModule pairing a frozen teacher with a student, and its callbacks.

The teacher is held outside the module's children: it never enters DDP/DeepSpeed wrapping, the
optimizer or checkpoints, and keeps its own dtype. Everything cross-cutting (checkpoints,
signals, RNG state, throughput) is a callback; `ctd.distill` wires them into a Trainer.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor
from torchmetrics import Metric

from ctd.config import DataConfig, ModelsConfig, OptimConfig, Trainable, TrainConfig
from ctd.data import DistillData
from ctd.errors import CtdError
from ctd.io import atomic_dir, write_json
from ctd.losses.logprobs import hidden_states, output_head, token_logprobs
from ctd.losses.objective import DistillObjective, LossSpec
from ctd.numerics import resolve_dtype
from ctd.strategies import loss_scale, make_strategy, optimizer_class, zero_stage
from ctd.zoo import load_model, load_tokenizer


class BitsPerByte(Metric):
    """Summed NLL (nats) over scored tokens / ln 2 / scored bytes; sums across ranks."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll: Tensor, num_bytes: Tensor) -> None:
        self.nll += nll.double().sum()
        self.bytes += num_bytes.sum()

    def compute(self) -> Tensor:
        return self.nll / math.log(2) / self.bytes.clamp(min=1)


def _trainable(student, train: Trainable, lora_rank: int, lora_alpha: float):
    """Freeze what does not train; LoRA wraps the student with peft. Embeddings always train."""
    if train == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                                     target_modules="all-linear"))
    elif train == "embeddings":
        student.requires_grad_(False)
    for emb in (student.get_input_embeddings(), student.get_output_embeddings()):
        if emb is not None:
            emb.weight.requires_grad_(True)
    return student


def last_layer_params(model) -> list[Tensor]:
    """The trainable parameters of the model's last decoder layer (its output head when that
    layer is frozen): where `grad_norm` balancing measures each loss's gradient."""
    layers = getattr(model.get_decoder(), "layers", None)
    params = [p for p in layers[-1].parameters() if p.requires_grad] if layers else []
    return params or [p for p in model.get_output_embeddings().parameters() if p.requires_grad]


class Distiller(pl.LightningModule):
    """Student trained on `objective` against a frozen teacher (None for CLM-only)."""

    def __init__(self, student, teacher, objective: DistillObjective, optim: OptimConfig,
                 train: Trainable = "all", lora_rank: int = 64, lora_alpha: float = 128.0):
        super().__init__()
        self.student = _trainable(student.train(), train, lora_rank, lora_alpha)
        self._teacher = (teacher.eval().requires_grad_(False),) if teacher is not None else ()
        self.objective, self.optim = objective, optim
        self.balance_params = last_layer_params(self.student)
        self.val_bpb, self.teacher_bpb = BitsPerByte(), BitsPerByte()
        self.teacher_bpb_done = False

    @property
    def teacher(self):
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    @torch.inference_mode()
    def _teacher_hidden(self, batch: dict) -> Tensor:
        return hidden_states(self.teacher, batch["teacher_input_ids"],
                             batch["teacher_attention_mask"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        s_hidden = hidden_states(self.student, batch["student_input_ids"],
                                 batch["student_attention_mask"])
        needs = self.objective.teacher_need != "none"
        parts = self.objective(
            batch, s_hidden, output_head(self.student),
            self._teacher_hidden(batch) if needs else None,
            output_head(self.teacher) if needs else None,
            int(batch["global_chunks"]), int(batch["global_tokens"]),
            balance_params=self.balance_params,
        )
        scale = loss_scale(self.trainer)
        # Each part is this micro-batch's share of the global mean; x (accumulation x ranks)
        # makes the logged value an estimate of that mean.
        share = self.trainer.accumulate_grad_batches * self.trainer.world_size
        self.log_dict({f"train/{k}": v * share for k, v in parts.items()}, prog_bar=False)
        self.log_dict({"train/chunks": batch["num_chunks"].sum().float(),
                       "train/dropped_chunks": batch["dropped_chunks"].sum().float()})
        return parts["loss"] * scale

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_bpb.update(self._nll(self.student, batch, "student"), batch["num_bytes"])
        if not self.teacher_bpb_done and self.teacher is not None:
            self.teacher_bpb.update(self._nll(self.teacher, batch, "teacher"), batch["num_bytes"])

    @staticmethod
    def _nll(model, batch: dict, side: str) -> Tensor:
        ids = batch[f"{side}_input_ids"]
        hidden = hidden_states(model, ids, batch[f"{side}_attention_mask"])
        lp, _ = token_logprobs(hidden, output_head(model), ids)
        return -(lp * (batch[f"{side}_chunk_ids"] >= 0)).sum()

    def on_validation_epoch_end(self) -> None:
        self.log("val/bpb", self.val_bpb.compute(), prog_bar=True, sync_dist=False)
        self.val_bpb.reset()
        if not self.teacher_bpb_done and self.teacher is not None:
            self.log("val/teacher_bpb", self.teacher_bpb.compute())
            self.teacher_bpb_done = True

    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.student.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = optimizer_class(self.trainer.strategy)(groups, lr=o.lr, betas=o.betas)
        total = max(self.trainer.max_steps, 1)

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            left = max(total - step, 0) / max(total - o.warmup_steps, 1)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * left

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["teacher_bpb_done"] = self.teacher_bpb_done

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.teacher_bpb_done = checkpoint.get("teacher_bpb_done", False)


class TokensPerSecond(pl.Callback):
    """Teacher + student tokens per second of wall time, in the progress bar and the logs."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch["student_attention_mask"].sum() + batch["teacher_attention_mask"].sum()
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        pl_module.log("tokens_per_s", tokens.float() / seconds, prog_bar=True)


class Checkpoints(pl.Callback):
    """Saves `dir/last.ckpt` every `every` optimizer steps, at the end, and on SIGINT/SIGTERM
    (then stops). Each save is written beside and renamed, so a crash never leaves a broken
    last checkpoint. Also carries the RNG states, so a resumed run draws the same numbers."""

    def __init__(self, directory: Path, every: int):
        self.dir, self.every = Path(directory), every
        self.stop_requested = self.interrupted = False
        self._saved_step = -1
        self._previous: dict = {}

    @property
    def last(self) -> Path:
        return self.dir / "last.ckpt"

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def on_fit_start(self, trainer, pl_module) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass

    def on_fit_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._saved_step or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        stop = trainer.strategy.reduce_boolean_decision(self.stop_requested, all=False)
        if stop or step % self.every == 0:
            self.save(trainer)
        if stop:
            self.interrupted = trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer)

    def save(self, trainer) -> None:
        tmp = self.dir / f".last.ckpt.tmp-{trainer.global_step}"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            old = self.dir / ".last.ckpt.old"
            if self.last.exists():
                self.last.rename(old)
            tmp.rename(self.last)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        trainer.strategy.barrier("checkpoint")
        self._saved_step = trainer.global_step

    def state_dict(self) -> dict:
        return {"rng": _collect_rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        _set_rng_states(state_dict["rng"])


def check_tokenizer_fits(model, tokenizer, role: str) -> None:
    """A model must have an embedding row for every token its tokenizer can produce."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise CtdError(
            f"the {role} has {rows} embedding rows but its tokenizer has {len(tokenizer)} "
            f"tokens; give the {role} its own tokenizer (or transplant the tokenizer first)"
        )


# Settings a resumed run may change: they do not alter what is computed.
_RESUME_FREE = {"data.num_workers", "train.threads", "train.progress", "train.log_every"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_out(out: Path, config: dict, resume: bool) -> None:
    """Refuse (before anything is written) a resume that cannot continue this config, and a
    fresh run into a used directory."""
    saved, ckpt = out / "config.json", out / "checkpoints" / "last.ckpt"
    if resume:
        if not saved.exists() or not ckpt.exists():
            raise CtdError(f"nothing to resume in {out}: no config.json or checkpoints/last.ckpt")
        old, new = _flat(json.loads(saved.read_text())), _flat(json.loads(json.dumps(config)))
        diff = sorted(k for k in old.keys() | new.keys()
                      if k not in _RESUME_FREE and old.get(k) != new.get(k))
        if diff:
            raise CtdError(f"{out} was made by a different config (differs in: {', '.join(diff)}); "
                           "resume with the same config or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise CtdError(f"output directory {out} is not empty; pass --resume to continue it "
                       "or choose another --out")


def _export(module: Distiller, trainer: pl.Trainer, tokenizer, ckpt: Path, dest: Path) -> None:
    """The student as an HF directory (LoRA merged), written to a temp path and renamed."""
    student = module.student
    if zero_stage(trainer.strategy) == 3:  # parameters are partitioned: rebuild from the ckpt
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        student.load_state_dict({k.removeprefix("student."): v for k, v in state.items()
                                 if k.startswith("student.")})
    if hasattr(student, "merge_and_unload"):
        student = student.merge_and_unload()
    if trainer.is_global_zero:
        with atomic_dir(dest, overwrite=True) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)


def distill(models: ModelsConfig, data: DataConfig, losses: list[LossSpec], balance: str,
            optim: OptimConfig, train: TrainConfig, out: Path, resume: bool = False,
            callbacks: tuple[pl.Callback, ...] = (), strategy=None) -> dict:
    """Train the student on the objective; checkpoints and the export go under `out`.

    Returns a summary: steps taken, whether a signal interrupted the run, the export path.
    """
    out = Path(out).expanduser().resolve()
    config = {"models": asdict(models), "data": asdict(data), "losses": [asdict(s) for s in losses],
              "balance": balance, "optim": asdict(optim), "train": asdict(train)}
    rank_zero = rank_zero_only.rank == 0
    if rank_zero:
        _check_out(out, config, resume)
    if train.threads:
        torch.set_num_threads(train.threads)
    t_tok = load_tokenizer(models.teacher_tokenizer or models.teacher)
    s_tok = load_tokenizer(models.student_tokenizer or models.student)
    objective = DistillObjective(losses, t_tok, s_tok, balance)
    dm = DistillData(t_tok, s_tok, data, train.accumulate)
    dm.setup("fit")  # alignment errors surface here, before anything is written
    student = load_model(models.student)
    check_tokenizer_fits(student, s_tok, "student")
    teacher = None
    if objective.teacher_need != "none":
        teacher = load_model(models.teacher, dtype=resolve_dtype(models.teacher_dtype))
        check_tokenizer_fits(teacher, t_tok, "teacher")
    module = Distiller(student, teacher, objective, optim, models.trainable, models.lora_rank,
                       models.lora_alpha)
    if rank_zero and not resume:
        write_json(out / "config.json", config)
    ckpts = Checkpoints(out / "checkpoints", train.checkpoint_every)
    trainer = pl.Trainer(
        max_steps=train.max_steps, accumulate_grad_batches=train.accumulate,
        precision="32-true" if train.precision == "auto" else train.precision,
        accelerator=train.accelerator, devices=train.devices,
        strategy=strategy or make_strategy(train.strategy, train.deepspeed_config),
        gradient_clip_val=optim.grad_clip or None,
        val_check_interval=train.val_every * train.accumulate if train.val_every else None,
        limit_val_batches=None if train.val_every else 0, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, log_every_n_steps=train.log_every, use_distributed_sampler=False,
        logger=[CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tensorboard")],
        callbacks=[*callbacks, TokensPerSecond(), ckpts], enable_checkpointing=False,
        enable_progress_bar=train.progress, default_root_dir=out,
    )
    # Our own checkpoint (it holds numpy RNG state, which weights_only loading rejects).
    trainer.fit(module, datamodule=dm, ckpt_path=ckpts.last if resume else None,
                weights_only=False)
    summary = {"steps": trainer.global_step, "interrupted": ckpts.interrupted,
               "checkpoint": str(ckpts.last), "export": None}
    if not ckpts.interrupted:
        _export(module, trainer, s_tok, ckpts.last, out / "model")
        summary["export"] = str(out / "model")
    return summary


def distill_step(models: ModelsConfig, data: DataConfig, losses: list[LossSpec], balance: str,
                 optim: OptimConfig, train: TrainConfig, out: Path) -> dict:
    """`distill` as a recipe step: continues `out`'s last checkpoint if an earlier run was
    interrupted, and raises KeyboardInterrupt if this one is (the checkpoint is kept)."""
    resume = (Path(out) / "checkpoints" / "last.ckpt").exists()
    summary = distill(models, data, losses, balance, optim, train, out, resume=resume)
    if summary["interrupted"]:
        raise KeyboardInterrupt(f"training interrupted; run the recipe again to continue {out}")
    return summary
