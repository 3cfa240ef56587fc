"""The configuration dataclasses of training, light to import (no Lightning, no datasets):
the CLI builds its parser from them, and `ctd.data` / `ctd.train` consume them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation", "test", "all"]
SampleBy = Literal["line", "paragraph", "document"]
StrategyName = Literal["auto", "ddp", "deepspeed"]
Trainable = Literal["all", "embeddings", "lora"]


@dataclass
class DataConfig:
    """Where the text comes from and how it is batched.

    Args:
        corpus: zoo corpus (wiki-en, gsm-symbolic) or a local .txt/.json/.jsonl/.parquet file.
        val_corpus: held-out corpus for validation bpb; default: `corpus`'s validation split.
        text_field: the text column of a local file.
        sample_by: how a .txt file is cut into documents.
        max_length: tokens per side, doc-start included; both sides are cut on one byte boundary.
        batch_size: examples per micro-batch and device.
        val_batch_size: examples per validation batch.
        max_documents: use only the first this many training documents.
        val_documents: validation documents (the first ones of the split).
        num_workers: processes for the one-time tokenize-and-align map and DataLoader workers.
        seed: shuffling seed; the order is a function of (seed, epoch) only.
    """

    corpus: str = "wiki-en"
    val_corpus: str | None = None
    text_field: str = "text"
    sample_by: SampleBy = "paragraph"
    max_length: int = 512
    batch_size: int = 4
    val_batch_size: int = 8
    max_documents: int | None = None
    val_documents: int = 64
    num_workers: int = 0
    seed: int = 0


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then linear decay to `min_lr_ratio * lr` at the last step."""

    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


@dataclass
class ModelsConfig:
    """Teacher and student (zoo name, HF directory, .gguf or hub id) and what of the student
    trains. Tokenizers default to each model's own."""

    teacher: str = "smollm2-135m"
    student: str = "smollm2-135m"
    teacher_tokenizer: str | None = None
    student_tokenizer: str | None = None
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    train: Trainable = "all"
    lora_rank: int = 64
    lora_alpha: float = 128.0


@dataclass
class TrainConfig:
    """Steps, precision, devices and the checkpoint/validation cadence (in optimizer steps)."""

    max_steps: int = 100
    accumulate: int = 1
    precision: str = "32-true"
    strategy: StrategyName = "auto"
    deepspeed_config: Path | None = None
    accelerator: str = "auto"
    devices: int = 1
    checkpoint_every: int = 50
    val_every: int = 50
    log_every: int = 1
    threads: int | None = None
    progress: bool = True
