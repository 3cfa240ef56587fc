"""Corpora -> aligned teacher/student batches, laid out so every optimizer step is known ahead.

Tokenizing both sides and aligning is the slow part of the input pipeline (HF tokenization runs
at a few MB/s per side on a CPU core), so it runs once per corpus, tokenizer pair and
max_length, in a cached `datasets.map` (`aligned_rows`); DataLoader workers then only pad.

Exact global normalisation: ALM divides by the non-empty chunks of the GLOBAL batch (all
accumulation micro-batches on all data-parallel ranks), CLM by its loss tokens. Both counts are
columns of the aligned rows, so the sampler, which lays out each optimizer step's global batch
itself, attaches the step's totals to every micro-batch it yields. No communication is needed.

Resume: the order is a pure function of (seed, epoch, step), so a resumed run skips the
optimizer steps already taken in its epoch and sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import ctd
from ctd.collate import AlignedCollator, pad
from ctd.config import DataConfig
from ctd.corpora import load_corpus
from ctd.errors import CtdError
from ctd.zoo import cache_dir

log = logging.getLogger(__name__)

_FIELDS = ("text", "prompt", "response")


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


class _Rows(Dataset):
    """Aligned rows read one at a time; a key may carry its step's global totals."""

    def __init__(self, ds: datasets.Dataset):
        self.ds = ds.with_format("numpy")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[dict]:
        """A whole batch in one read (DataLoader calls this): far cheaper than row by row."""
        keys = [k if isinstance(k, tuple) else (k,) for k in keys]
        cols = self.ds[[int(k[0]) for k in keys]]
        rows = [{name: col[i] for name, col in cols.items()} for i in range(len(keys))]
        for row, (_, *totals) in zip(rows, keys, strict=True):
            if totals:
                row["_step"] = totals
        return rows


class StepCollator:
    """Pads aligned rows; training batches also get the step's global counts
    (`global_chunks`, `global_tokens`)."""

    def __init__(self, teacher_start: int, student_start: int):
        self.teacher_start, self.student_start = teacher_start, student_start

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        steps = [row.pop("_step", None) for row in rows]
        batch = pad(rows, self.teacher_start, self.student_start)
        if steps[0] is not None:
            batch["global_chunks"] = torch.tensor(steps[0][0])
            batch["global_tokens"] = torch.tensor(steps[0][1])
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


def aligned_rows(ds: datasets.Dataset, collator: AlignedCollator, num_proc: int | None = None
                 ) -> datasets.Dataset:
    """Every example tokenized on both sides and aligned (`AlignedCollator.rows`), cached on
    disk: columns teacher_ids, teacher_chunks, student_ids, student_chunks, num_chunks,
    num_bytes, dropped_chunks, truncated_chunks, loss_tokens."""
    key = _fingerprint(ds._fingerprint, _tokenizer_key(collator.teacher_tokenizer),
                       _tokenizer_key(collator.student_tokenizer), collator.max_length, _code_key())
    path = cache_dir() / "data" / f"aligned-{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f for f in _FIELDS if f in ds.column_names]

    def rows(batch: dict) -> dict:
        n = len(batch[fields[0]])
        out = collator.rows([_example({f: batch[f][i] for f in fields}) for i in range(n)])
        cols = {k: [r[k] for r in out] for k in _ROW_FEATURES if k != "loss_tokens"}
        cols["loss_tokens"] = [int((r["student_chunks"] >= 0).sum()) for r in out]
        return cols

    return ds.map(rows, batched=True, batch_size=64, remove_columns=ds.column_names,
                  features=_ROW_FEATURES, cache_file_name=str(path), new_fingerprint=key,
                  num_proc=num_proc, desc="tokenizing and aligning")


_ROW_FEATURES = datasets.Features(
    {k: datasets.Sequence(datasets.Value("int32"))
     for k in ("teacher_ids", "teacher_chunks", "student_ids", "student_chunks")}
    | {k: datasets.Value("int64") for k in ("num_chunks", "num_bytes", "dropped_chunks",
                                             "truncated_chunks", "loss_tokens")}
)


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
            self.train_ds = self._aligned(train, "train")
            self.counts = np.stack([self.train_ds["num_chunks"], self.train_ds["loss_tokens"]], 1)
            val = load_corpus(c.val_corpus or c.corpus, "validation" if c.val_corpus is None
                              else "all", c.text_field, c.sample_by)
            self.val_ds = self._aligned(val.select(range(min(c.val_documents, len(val)))), "val")

    def _aligned(self, ds: datasets.Dataset, name: str) -> datasets.Dataset:
        """Aligned rows of a split, with what the alignment dropped or cut logged once."""
        rows = aligned_rows(ds, self.collator, self.config.num_workers or None)
        cut = np.asarray(rows["truncated_chunks"])
        log.info("%s: %d examples, %d chunks, %d empty, %d truncated (%d chunks cut), "
                 "%d chunks dropped at a prompt/response boundary", name, len(rows),
                 int(np.sum(rows["num_chunks"])), int(np.sum(np.asarray(rows["num_chunks"]) == 0)),
                 int((cut > 0).sum()), int(cut.sum()), int(np.sum(rows["dropped_chunks"])))
        return rows

    def _loader(self, ds: datasets.Dataset, **kwargs) -> DataLoader:
        collate = StepCollator(self.collator.teacher_start, self.collator.student_start)
        return DataLoader(_Rows(ds), num_workers=self.config.num_workers, collate_fn=collate,
                          persistent_workers=self.config.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        sampler = StepSampler(self.counts, self.config.batch_size, self.accumulate,
                              t.world_size if t else 1, t.global_rank if t else 0, self.config.seed)
        if t is not None:
            sampler.resume_at(t.global_step)
        return self._loader(self.train_ds, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t else (0, 1)
        shard = self.val_ds.select(range(rank, len(self.val_ds), world))
        return self._loader(shard, batch_size=self.config.val_batch_size)
