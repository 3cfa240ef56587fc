"""Corpora -> aligned teacher/student batches, laid out so every optimizer step is known ahead.

Exact global normalisation: ALM divides by the non-empty chunks of the GLOBAL batch (all
accumulation micro-batches on all data-parallel ranks), CLM by its loss tokens. Both counts
depend only on the text (the collator cuts each example independently), so they are computed
once per example (a cached `datasets.map`) and the sampler, which lays out each optimizer
step's global batch itself, attaches the step's totals to every micro-batch it yields. No
communication is needed, and the collate step re-checks the counts it sees.

Resume: the order is a pure function of (seed, epoch, step), so a resumed run skips the
optimizer steps already taken in its epoch and sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import ctd
from ctd.collate import AlignedCollator
from ctd.corpora import SampleBy, load_corpus
from ctd.errors import CtdError
from ctd.zoo import cache_dir

log = logging.getLogger(__name__)

_FIELDS = ("text", "prompt", "response")


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
        num_workers: DataLoader worker processes (alignment runs there).
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


class StepSampler:
    """Micro-batches of one rank; each item is a list of (index, step_chunks, step_tokens).

    Optimizer step s of epoch e takes the global batch perm_e[s*G:(s+1)*G] with
    G = batch * accumulate * world; micro-batch m of rank r is its slice (m*world + r).
    """

    def __init__(self, counts: np.ndarray, batch_size: int, accumulate: int, world: int,
                 rank: int, seed: int):
        self.counts, self.batch_size, self.accumulate = counts, batch_size, accumulate
        self.world, self.rank, self.seed = world, rank, seed
        self.epoch, self.skip_steps = 0, 0
        self.steps_per_epoch = len(counts) // (batch_size * accumulate * world)
        if self.steps_per_epoch == 0:
            raise CtdError(
                f"{len(counts)} training documents do not fill one optimizer step of "
                f"{batch_size * accumulate * world} (batch x accumulation x devices); "
                "use more documents or a smaller batch"
            )

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start."""
        self.epoch = epoch

    def resume_at(self, global_step: int) -> None:
        """Skip the steps of the current epoch already taken (once, for the next iteration)."""
        self.skip_steps = global_step % self.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulate

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.counts))
        g = self.batch_size * self.accumulate * self.world
        skip, self.skip_steps = self.skip_steps, 0
        for step in range(skip, self.steps_per_epoch):
            ids = perm[step * g : (step + 1) * g]
            chunks, tokens = (int(x) for x in self.counts[ids].sum(0))
            for m in range(self.accumulate):
                lo = (m * self.world + self.rank) * self.batch_size
                yield [(int(i), chunks, tokens) for i in ids[lo : lo + self.batch_size]]


def _example(row: dict) -> dict:
    """What the collator reads: prompt/response where present (the loss mask), else text."""
    return {k: row[k] for k in ("prompt", "response")} if "prompt" in row else {"text": row["text"]}


class _Examples(Dataset):
    """A datasets.Dataset read one example at a time (keys may carry step totals)."""

    def __init__(self, ds: datasets.Dataset, counts: np.ndarray | None = None):
        self.ds, self.counts = ds, counts
        self.fields = [f for f in _FIELDS if f in ds.column_names]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        index, *totals = key if isinstance(key, tuple) else (key,)
        row = self.ds[index]
        ex = _example({f: row[f] for f in self.fields})
        if totals:
            ex["_step"] = (*totals, *self.counts[index])
        return ex


class StepCollator:
    """AlignedCollator plus the step's global counts (`global_chunks`, `global_tokens`)."""

    def __init__(self, collator: AlignedCollator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        steps = [ex.pop("_step") for ex in examples]
        batch = self.collator(examples)
        chunks, tokens, *_ = steps[0]
        expected = np.asarray([s[2:] for s in steps]).sum(0)
        seen = (int(batch["num_chunks"].sum()), int(batch["student_loss_mask"].sum()))
        if tuple(expected) != seen:
            raise RuntimeError(f"cached counts {tuple(expected)} != collated {seen}: stale cache")
        batch["global_chunks"] = torch.tensor(chunks)
        batch["global_tokens"] = torch.tensor(tokens)
        return batch


def _fingerprint(*parts: object) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def _tokenizer_key(tokenizer) -> str:
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def _code_key() -> str:
    """The collator's behaviour is part of the cache key: counts go stale when it changes."""
    root = Path(ctd.__file__).parent
    return _fingerprint(*((root / f).read_bytes() for f in ("collate.py", "align.py", "tokens.py")))


def example_counts(ds: datasets.Dataset, collator: AlignedCollator) -> np.ndarray:
    """[N, 2] int64: (non-empty chunks, student loss tokens) per example, cached on disk."""
    key = _fingerprint(ds._fingerprint, _tokenizer_key(collator.teacher_tokenizer),
                       _tokenizer_key(collator.student_tokenizer), collator.max_length, _code_key())
    path = cache_dir() / "data" / f"counts-{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f for f in _FIELDS if f in ds.column_names]

    def count(rows: dict) -> dict:
        n = len(rows[fields[0]])
        batch = collator([_example({f: rows[f][i] for f in fields}) for i in range(n)])
        return {"num_chunks": batch["num_chunks"].tolist(),
                "loss_tokens": batch["student_loss_mask"].sum(1).tolist()}

    out = ds.map(count, batched=True, batch_size=64, remove_columns=ds.column_names,
                 cache_file_name=str(path), new_fingerprint=key, desc="aligning")
    return np.stack([np.asarray(out["num_chunks"]), np.asarray(out["loss_tokens"])], 1)


class DistillData(pl.LightningDataModule):
    """Training batches in a resumable, globally-counted order; validation batches in order."""

    def __init__(self, teacher_tokenizer, student_tokenizer, config: DataConfig,
                 accumulate: int = 1):
        super().__init__()
        self.config, self.accumulate = config, accumulate
        self.collator = AlignedCollator(teacher_tokenizer, student_tokenizer, config.max_length)
        self.train_ds: datasets.Dataset | None = None

    def setup(self, stage: str) -> None:
        c = self.config
        if self.train_ds is None:
            train = load_corpus(c.corpus, "train", c.text_field, c.sample_by)
            if c.max_documents is not None:
                train = train.select(range(min(c.max_documents, len(train))))
            self.counts = example_counts(train, self.collator)
            self.train_ds = train
            val = load_corpus(c.val_corpus or c.corpus, "validation" if c.val_corpus is None
                              else "all", c.text_field, c.sample_by)
            self.val_ds = val.select(range(min(c.val_documents, len(val))))

    def _loader(self, ds: Dataset, **kwargs) -> DataLoader:
        return DataLoader(ds, num_workers=self.config.num_workers,
                          persistent_workers=self.config.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        sampler = StepSampler(self.counts, self.config.batch_size, self.accumulate,
                              t.world_size if t else 1, t.global_rank if t else 0, self.config.seed)
        if t is not None:
            sampler.resume_at(t.global_step)
        return self._loader(_Examples(self.train_ds, self.counts), batch_sampler=sampler,
                            collate_fn=StepCollator(self.collator))

    def val_dataloader(self) -> DataLoader:
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t else (0, 1)
        shard = self.val_ds.select(range(rank, len(self.val_ds), world))
        return self._loader(_Examples(shard), batch_size=self.config.val_batch_size,
                            collate_fn=self.collator)
