"""The one configuration tree of training: `ctd distill` reads it, recipes embed it.

Light to import (no Lightning, no datasets): the CLI builds its parser from these dataclasses.
Fields marked `free` change how a run goes (threads, workers, progress display), not what it
computes, so a run may continue a directory written with other values of them
(`ctd.io.check_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctd.errors import CtdError
from ctd.losses.objective import Balance, LossSpec

Split = Literal["train", "validation", "test", "all"]
SampleBy = Literal["line", "paragraph", "document"]
StrategyName = Literal["auto", "ddp", "deepspeed"]
Trainable = Literal["all", "embeddings", "lora"]
DType = Literal["auto", "float32", "bfloat16"]

_FREE = {"free": True}  # metadata of fields that do not change what a run computes


def _at_least(config: object, section: str, minimum: float, *names: str) -> None:
    """Refuse a setting below its minimum here, by its flag's name, rather than as a division
    by zero inside the trainer."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise CtdError(f"{section}.{name} must be at least {minimum:g} (got {value})")


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut and batched.

    Args:
        corpus: zoo corpus (wiki-en, gsm-symbolic, python-docs) or a local .txt/.json/.jsonl/
            .parquet file.
        val_corpus: held-out corpus for validation; default: `corpus`'s validation split.
        text_field: the text column of a local file.
        sample_by: how a .txt file is cut into documents.
        max_length: tokens per window and side, doc-start token included.
        windows: cut each document into consecutive windows on byte offsets where both
            tokenizations have a token boundary, so every byte is trained on; false: only each
            document's first window.
        batch_size: windows per micro-batch and device.
        val_batch_size: windows per validation batch.
        max_documents: use only the first this many training documents.
        val_documents: validation documents (the first ones of the split).
        strict: a document a tokenizer cannot reproduce byte-exactly is an error (default: it
            is skipped and counted).
        teacher_cache: where the teacher's token log-probs are cached for objectives that need
            only them (alm, clm): "auto" (under $CTD_CACHE), "off" (run the teacher live), or a
            directory (e.g. built on another machine with `ctd teacher-cache`).
        num_workers: DataLoader worker processes (the one-time tokenize-and-align pass runs in
            this process, the tokenizers on every core).
        seed: shuffling seed; the order is a function of (seed, epoch) only.
    """

    corpus: str = "wiki-en"
    val_corpus: str | None = None
    text_field: str = "text"
    sample_by: SampleBy = "paragraph"
    max_length: int = 512
    windows: bool = True
    batch_size: int = 4
    val_batch_size: int = 8
    max_documents: int | None = None
    val_documents: int = 64
    strict: bool = False
    teacher_cache: str = "auto"
    num_workers: int = field(default=0, metadata=_FREE)
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self, "data", 1, "max_length", "batch_size", "val_batch_size", "max_documents")
        _at_least(self, "data", 0, "val_documents", "num_workers")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then linear decay to `min_lr_ratio * lr` at the last step;
    gradients clipped to norm `grad_clip` (0: off)."""

    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _at_least(self, "optim", 0, "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
                  "grad_clip")


@dataclass
class ModelsConfig:
    """Teacher and student (zoo name, HF directory, .gguf or hub id) and what of the student
    trains. Tokenizers default to each model's own; "auto" dtypes follow the hardware
    (`ctd.numerics.fast_dtype`). LoRA adapters (r, alpha) go on every linear layer; the
    embeddings train in every mode."""

    teacher: str | None = None
    student: str | None = None
    teacher_tokenizer: str | None = None
    student_tokenizer: str | None = None
    teacher_dtype: DType = "auto"
    trainable: Trainable = "all"
    lora_rank: int = 64
    lora_alpha: float = 64.0

    def __post_init__(self) -> None:
        _at_least(self, "models", 1, "lora_rank")


@dataclass
class TrainConfig:
    """Steps, precision, devices and the checkpoint/validation cadence (in optimizer steps).
    `precision` "auto" is bf16-mixed where the accelerator computes bf16 fast, else 32-true;
    `num_nodes` > 1 runs on several machines (launched by torchrun or SLURM, see docs)."""

    max_steps: int = 100
    accumulate: int = 1
    precision: str = "auto"
    strategy: StrategyName = "auto"
    deepspeed_config: Path | None = None
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    checkpoint_every: int = 50
    val_every: int = 50
    log_every: int = field(default=1, metadata=_FREE)
    threads: int | None = field(default=None, metadata=_FREE)
    progress: bool = field(default=True, metadata=_FREE)

    def __post_init__(self) -> None:
        _at_least(self, "train", 1, "max_steps", "accumulate", "devices", "num_nodes",
                  "log_every", "threads")
        _at_least(self, "train", 0, "checkpoint_every", "val_every")


@dataclass
class DistillConfig:
    """Everything one training run computes from: what `ctd distill --config` reads."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: list[LossSpec] = field(default_factory=lambda: [LossSpec("alm"), LossSpec("clm")])
    balance: Balance = "grad_norm"
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def free_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of the `free` fields of a config dataclass and the dataclasses in it."""
    import typing

    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("free"):
            out.add(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out |= free_keys(hints[f.name], f"{prefix}{f.name}.")
    return out
