"""The LightningModule pairing a frozen teacher with a student, and the run around it.

The teacher is held outside the module's children: it never enters DDP/DeepSpeed wrapping, the
optimizer or checkpoints, and keeps its own dtype. Objectives that need only the teacher's token
log-probs (alm, clm) read them from the teacher cache and never load the teacher. Cross-cutting
work is Lightning's: ModelCheckpoint saves `last.ckpt` every `checkpoint_every` steps through an
atomic CheckpointIO, ThroughputMonitor logs tokens/s, CSV and TensorBoard loggers log; ctd adds
one callback, for stopping cleanly on a signal.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import ModelCheckpoint, ThroughputMonitor
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor
from torch.utils import serialization
from torchmetrics import MeanMetric

from ctd.card import distill_card
from ctd.config import DistillConfig, OptimConfig, Trainable, free_keys
from ctd.data import DistillData
from ctd.errors import CtdError
from ctd.evaluate import BitsPerByte, target_logprobs
from ctd.io import RunLock, atomic_dir, check_config, disk_full, write_json
from ctd.losses.alm import chunk_logliks
from ctd.losses.logprobs import hidden_states, output_head
from ctd.losses.objective import DistillObjective
from ctd.numerics import fast_dtype, resolve_dtype
from ctd.strategies import loss_scale, make_optimizer, make_strategy, zero_stage
from ctd.teacher_cache import TeacherCache
from ctd.zoo import load_model, model_tokenizer


def _trainable(student, trainable: Trainable, lora_rank: int, lora_alpha: float):
    """Freeze what does not train; LoRA wraps the student with peft. Embeddings always train."""
    if trainable == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                                     target_modules="all-linear"))
    elif trainable == "embeddings":
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


def chunk_agreement(t_lp: Tensor, s_lp: Tensor, t_chunks: Tensor, s_chunks: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """Sum over chunks of |l_T(c) - l_S(c)| (nats; plain chunk log-likelihoods) and the number
    of chunks: how closely the student's likelihoods follow the teacher's."""
    lt, ls, exists = chunk_logliks(t_lp.float(), s_lp.float(), t_chunks, s_chunks)
    return (lt - ls).abs()[exists].sum(), exists.sum()


class Distiller(pl.LightningModule):
    """Student trained on `objective` against a frozen teacher, live (`teacher`) or cached in
    the batches; None and no cache for CLM alone."""

    def __init__(self, student, teacher, objective: DistillObjective, optim: OptimConfig,
                 trainable: Trainable = "all", lora_rank: int = 64, lora_alpha: float = 64.0):
        super().__init__()
        self.student = _trainable(student.train(), trainable, lora_rank, lora_alpha)
        self._teacher = (teacher.eval().requires_grad_(False),) if teacher is not None else ()
        self.objective, self.optim = objective, optim
        self.balance_params = last_layer_params(self.student)
        self.val_bpb, self.teacher_bpb = BitsPerByte(), BitsPerByte()
        self.agreement = MeanMetric()
        self.teacher_bpb_done = False

    @property
    def teacher(self):
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    on_validation_start = on_fit_start

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        s_hidden = hidden_states(self.student, batch["student_input_ids"],
                                 batch["student_attention_mask"])
        live = self.teacher is not None and self.objective.teacher_need != "none"
        with torch.inference_mode():
            t_hidden = hidden_states(self.teacher, batch["teacher_input_ids"],
                                     batch["teacher_attention_mask"]) if live else None
        parts = self.objective(
            batch, s_hidden, output_head(self.student), t_hidden,
            output_head(self.teacher) if live else None,
            int(batch["global_chunks"]), int(batch["global_tokens"]),
            balance_params=self.balance_params,
        )
        # Each part is this micro-batch's share of the global mean; x (accumulation x ranks)
        # makes the logged value an estimate of that mean.
        share = self.trainer.accumulate_grad_batches * self.trainer.world_size
        self.log_dict({f"train/{k}": v * share for k, v in parts.items()})
        self.log_dict({"train/chunks": batch["num_chunks"].sum().float(),
                       "train/dropped_chunks": batch["dropped_chunks"].sum().float()})
        return parts["loss"] * loss_scale(self.trainer)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Bits per byte of the student (the same computation as `ctd eval`), and against the
        teacher (cached or live): its bpb once, and the chunk-likelihood agreement."""
        s_lp = target_logprobs(self.student, batch["student_input_ids"],
                               batch["student_attention_mask"])
        self.val_bpb.update(-(s_lp * (batch["student_chunk_ids"] >= 0)).sum(1),
                            batch["num_bytes"])
        if "teacher_logprobs" in batch:
            t_lp = batch["teacher_logprobs"]
        elif self.teacher is not None:
            t_lp = target_logprobs(self.teacher, batch["teacher_input_ids"],
                                   batch["teacher_attention_mask"])
        else:
            return
        if not self.teacher_bpb_done:
            self.teacher_bpb.update(-(t_lp * (batch["teacher_chunk_ids"] >= 0)).sum(1),
                                    batch["num_bytes"])
        total, chunks = chunk_agreement(t_lp, s_lp, batch["teacher_chunk_ids"],
                                        batch["student_chunk_ids"])
        self.agreement.update(total / chunks.clamp(min=1), chunks)

    def on_validation_epoch_end(self) -> None:
        self.log("val/bpb", self.val_bpb.compute(), prog_bar=True)
        self.val_bpb.reset()
        if self.agreement.update_count:
            self.log("val/agreement", self.agreement.compute())
            self.agreement.reset()
        if not self.teacher_bpb_done and self.teacher_bpb.update_count:
            self.log("val/teacher_bpb", self.teacher_bpb.compute())
            self.teacher_bpb_done = True

    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.student.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = make_optimizer(self.trainer.strategy, groups, o.lr, o.betas)
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its final name, syncs it to disk and renames it: a crash or a
    kill -9 mid-write leaves the previous checkpoint intact, a full disk is one clear error.
    (Lightning's own writes through a temporary file in the system's temp directory and moves
    it, which is a copy when that is another filesystem.) No CRC32 in the zip: computing it took
    3-4 s of a 1.6 GB checkpoint's 5 s, and the write-sync-rename already guarantees a whole file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # one fixed name: a write killed mid-way leaves a file the next write replaces (the
        # run directory's lock keeps a second writer out)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f, serialization.config.patch({"save.compute_crc32": False}):
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if disk_full(e):
                raise CtdError(f"cannot write checkpoint {path}: no space left on the device; "
                               "free some and run again with --resume (the previous checkpoint "
                               "is intact)") from e
            raise


class StopOnSignal(pl.Callback):
    """On SIGINT/SIGTERM: finish the optimizer step under way, save last.ckpt, stop. (Lightning
    stops on SIGTERM after any micro-batch, mid-accumulation, and treats SIGINT as a crash.)
    Also saves last.ckpt when training ends between two of ModelCheckpoint's saves.

    Each step is written once: a checkpoint holds the student and its optimizer (seconds per
    write). A ModelCheckpoint that has saved nothing in this run saves last.ckpt itself when
    training ends (Lightning 2.6), so then this callback leaves the last save to it."""

    def __init__(self, last: Path):
        self.last = Path(last)
        self.requested = self.interrupted = False
        self.saved_step = -1  # the step last.ckpt holds
        self.lightning_saved = self._saving = False  # ModelCheckpoint saved in this run
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def on_fit_start(self, trainer, pl_module) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass

    def on_train_start(self, trainer, pl_module) -> None:
        self.saved_step = trainer.global_step  # a resumed run starts from a saved step

    def on_fit_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_step = trainer.global_step
        self.lightning_saved |= not self._saving

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the step is not done
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self._save(trainer)
            self.interrupted = trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer) -> None:
        leaves_it = not self.lightning_saved and any(
            isinstance(c, ModelCheckpoint) and c.save_last for c in trainer.checkpoint_callbacks)
        if trainer.global_step != self.saved_step and not leaves_it:
            self._saving = True
            try:
                trainer.save_checkpoint(self.last, weights_only=False)
            finally:
                self._saving = False


def check_tokenizer_fits(model, tokenizer, role: str) -> None:
    """A model must have an embedding row for every token its tokenizer can produce."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise CtdError(
            f"the {role} has {rows} embedding rows but its tokenizer has {len(tokenizer)} "
            f"tokens; give the {role} its own tokenizer (or transplant the tokenizer first)"
        )


def precision(name: str, accelerator: str) -> str:
    """Lightning's precision; "auto" is bf16-mixed where the device computes bf16 fast."""
    if name != "auto":
        return name
    device = "cuda" if accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    return "bf16-mixed" if fast_dtype(device) == torch.bfloat16 else "32-true"


def _export(module: Distiller, trainer: pl.Trainer, tokenizer, ckpt: Path, dest: Path,
            config: dict, data: dict) -> None:
    """The student as an HF directory (LoRA merged) with its training config and model card,
    written to a temporary path and renamed."""
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
            write_json(tmp / "ctd-distill.json", config)
            distill_card(tmp, config, trainer.global_step, dest.parent, data)


def _check_out(out: Path, config: dict, resume: bool) -> None:
    """Refuse (before anything is written) a resume that cannot continue this config, and a
    fresh run into a used directory."""
    if resume:
        if not (out / "checkpoints" / "last.ckpt").exists():
            raise CtdError(f"nothing to resume in {out}: no checkpoints/last.ckpt")
        check_config(out / "config.json", config, free_keys(DistillConfig))
    elif out.exists() and any(p.name != ".lock" for p in out.iterdir()):
        raise CtdError(f"output directory {out} is not empty; pass --resume to continue it "
                       "or choose another --out")


# Lightning warnings that do not apply here: the training order resumes from the global step
# (StepSampler.resume_at), and throughput is reported in items/s without a FLOP estimate.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*`flops_per_batch` attribute.*")
# Libraries calling APIs their dependencies deprecate (Lightning 2.6 a torch pytree check, peft a
# transformers checkpointing flag): nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*")


def _cache(config: DistillConfig, tokenizer, load: Callable, splits: tuple[str, ...],
           rebuild: str) -> TeacherCache:
    return TeacherCache(config.data.teacher_cache, config.models.teacher,
                        resolve_dtype(config.models.teacher_dtype), tokenizer, load, splits,
                        rebuild=rebuild, batch_size=config.data.val_batch_size,
                        show_progress=config.train.progress)


def build_teacher_cache(config: DistillConfig) -> dict[str, Path]:
    """The teacher cache of both splits of a config's data, built where missing; returns where
    each split's lives."""
    m = config.models
    if config.data.teacher_cache == "off":
        raise CtdError("data.teacher_cache is off; set it to auto or a directory")
    if m.teacher is None or m.student is None:
        raise CtdError("give both models.teacher and models.student (the student's tokenizer "
                       "decides the windows)")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    t_tok = model_tokenizer(m.teacher, m.teacher_tokenizer)
    s_tok = model_tokenizer(m.student, m.student_tokenizer)
    rows = DistillData(t_tok, s_tok, config.data).rows()
    cache = _cache(config, t_tok, lambda: load_model(m.teacher, dtype=resolve_dtype(
        m.teacher_dtype)), ("train", "validation"), "ctd teacher-cache --config CONFIG")
    cache(rows)
    return {split: cache.path(split, cache.meta(rows[split])) for split in cache.splits}


def distill(config: DistillConfig, out: Path, resume: bool = False,
            callbacks: tuple[pl.Callback, ...] = (), strategy=None) -> dict:
    """Train the student on the objective; checkpoints, logs and the export go under `out`.

    Returns a summary: steps taken, whether a signal interrupted the run, the export path and
    the data statistics.
    """
    models, data, train = config.models, config.data, config.train
    if models.teacher is None or models.student is None:
        raise CtdError("give both models.teacher and models.student")
    out = Path(out).expanduser().resolve()
    saved = json.loads(json.dumps(asdict(config), default=str))
    rank_zero = rank_zero_only.rank == 0
    with RunLock(out) if rank_zero else contextlib.nullcontext():
        if rank_zero:
            _check_out(out, saved, resume)
        if train.threads:
            torch.set_num_threads(train.threads)
        t_tok = model_tokenizer(models.teacher, models.teacher_tokenizer)
        s_tok = model_tokenizer(models.student, models.student_tokenizer)
        objective = DistillObjective(config.losses, t_tok, s_tok, config.balance)
        dtype = resolve_dtype(models.teacher_dtype)

        def load_teacher():
            teacher = load_model(models.teacher, dtype=dtype)
            check_tokenizer_fits(teacher, t_tok, "teacher")
            return teacher

        need = objective.teacher_need
        cache = None
        if data.teacher_cache != "off" and need != "hidden":
            cache = _cache(config, t_tok, load_teacher,
                           ("train", "validation") if need == "logprobs" else ("validation",),
                           f"ctd teacher-cache --config {out / 'config.json'}")
        dm = DistillData(t_tok, s_tok, data, train.accumulate, teacher_rows=cache)
        dm.setup("fit")  # alignment errors and the teacher cache build happen here
        student = load_model(models.student)
        check_tokenizer_fits(student, s_tok, "student")
        live = need == "hidden" or (need == "logprobs" and cache is None)
        module = Distiller(student, load_teacher() if live else None, objective, config.optim,
                           models.trainable, models.lora_rank, models.lora_alpha)
        if rank_zero:
            if not resume:
                write_json(out / "config.json", saved)
            write_json(out / "data_stats.json", dm.stats)
        last = out / "checkpoints" / "last.ckpt"
        stop = StopOnSignal(last)
        strategy = strategy or make_strategy(train.strategy, train.deepspeed_config)
        trainer = pl.Trainer(
            max_steps=train.max_steps, accumulate_grad_batches=train.accumulate,
            precision=precision(train.precision, train.accelerator),
            accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes,
            strategy=strategy,
            plugins=[] if zero_stage(strategy) is not None else [AtomicCheckpointIO()],
            gradient_clip_val=config.optim.grad_clip or None,
            val_check_interval=train.val_every * train.accumulate if train.val_every else None,
            limit_val_batches=None if train.val_every else 0, check_val_every_n_epoch=None,
            num_sanity_val_steps=0, log_every_n_steps=train.log_every,
            use_distributed_sampler=False,
            # a new version per start of the run (Lightning's CSV logger deletes an existing
            # file of its version); ctd.report.run_curves joins them
            logger=[CSVLogger(out, name="logs", flush_logs_every_n_steps=1),  # kill -9 loses none
                    TensorBoardLogger(out, name="tensorboard")],
            callbacks=[*callbacks, ThroughputMonitor(
                batch_size_fn=lambda b: b["student_input_ids"].shape[0],
                length_fn=lambda b: int(b["student_attention_mask"].sum()
                                        + b["teacher_attention_mask"].sum()),
                window_size=5),
                ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0,
                                every_n_train_steps=max(train.checkpoint_every, 1),
                                enable_version_counter=False), stop],
            enable_progress_bar=train.progress, enable_model_summary=False,
            inference_mode=False,  # no_grad: metric states from validate() stay usable in fit()
            default_root_dir=out,
        )
        if train.val_every and not resume:  # the curves' step-0 point: the student as given
            trainer.validate(module, datamodule=dm, verbose=False)
        # numpy arrays in the loop state need weights_only=False (our own checkpoints)
        trainer.fit(module, datamodule=dm, ckpt_path=last if resume else None,
                    weights_only=False)
        summary = {"steps": trainer.global_step, "interrupted": stop.interrupted,
                   "checkpoint": str(last), "export": None, "data": dm.stats}
        if not stop.interrupted:
            _export(module, trainer, s_tok, last, out / "model", saved, dm.stats)
            summary["export"] = str(out / "model")
        return summary


def distill_step(config: DistillConfig, out: Path) -> dict:
    """`distill` as a recipe step: continues `out`'s last checkpoint if an earlier run was
    interrupted, and raises KeyboardInterrupt if this one is (the checkpoint is kept)."""
    resume = (Path(out) / "checkpoints" / "last.ckpt").exists()
    summary = distill(config, out, resume=resume)
    gc.collect()  # the trainer and the module refer to each other: free the models now
    if summary["interrupted"]:
        raise KeyboardInterrupt(f"training interrupted; run the recipe again to continue {out}")
    return summary
