"""Corpora -> aligned teacher/student batches, laid out so every optimizer step is known ahead.

Tokenizing both sides and aligning is the slow part of the input pipeline, so it runs once per
corpus, tokenizer pair and windowing, in a cached `datasets.map` (`aligned_rows`); DataLoader
workers then only pad. Objectives that need only the teacher's token log-probs read them from
the teacher cache (ctd.teacher_cache), stored beside the same rows.

Exact global normalisation: ALM divides by the non-empty chunks of the GLOBAL batch (all
accumulation micro-batches on all data-parallel ranks), CLM by its loss tokens. Both counts are
columns of the aligned rows, so the sampler, which lays out each optimizer step's global batch
itself, attaches the step's totals to every micro-batch it yields. No communication is needed.

Resume: the order is a pure function of (seed, epoch, step), so a resumed run skips the
optimizer steps already taken in its epoch and sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import ctd
from ctd.collate import COUNTS, Aligner, pad, stats
from ctd.config import DataConfig
from ctd.corpora import load_corpus
from ctd.errors import CtdError
from ctd.io import cache_dir

log = logging.getLogger(__name__)

_FIELDS = ("text", "prompt", "response")


class StepSampler:
    """Micro-batches of one rank; each item is a list of (row, step_chunks, step_tokens).

    `rows` are the trainable rows (windows with at least one chunk) and `counts` their
    (chunks, loss tokens). Optimizer step s of epoch e takes the global batch
    perm_e[s*G:(s+1)*G] with G = batch * accumulate * world; micro-batch m of rank r is its
    slice (m*world + r).
    """

    def __init__(self, rows: np.ndarray, counts: np.ndarray, batch_size: int, accumulate: int,
                 world: int, rank: int, seed: int):
        self.rows, self.counts = rows, counts
        self.batch_size, self.accumulate = batch_size, accumulate
        self.world, self.rank, self.seed = world, rank, seed
        self.epoch, self.skip_steps = 0, 0
        self.steps_per_epoch = len(counts) // (batch_size * accumulate * world)
        if self.steps_per_epoch == 0:
            raise CtdError(
                f"{len(counts)} training windows do not fill one optimizer step of "
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
                yield [(int(self.rows[i]), chunks, tokens) for i in ids[lo : lo + self.batch_size]]


class RowReader(Dataset):
    """Aligned rows read a batch at a time; a key may carry its step's global totals."""

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


def fingerprint(*parts: object) -> str:
    """A short stable key of reprs."""
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def content_key(ds: datasets.Dataset) -> str:
    """A key of a dataset's rows (a selection's, not its whole table's): their Arrow buffers
    hashed, cheap next to tokenizing."""
    import pyarrow as pa

    h = hashlib.sha1(repr(ds.column_names).encode())
    for batch in ds.with_format("arrow").iter(batch_size=65536):
        sink = pa.BufferOutputStream()  # IPC writes a slice's own bytes, not the table's
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        h.update(memoryview(sink.getvalue()))
    return h.hexdigest()[:16]


def tokenizer_key(tokenizer) -> str:
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _code_key() -> str:
    """The aligner's behaviour is part of the cache key: rows go stale when it changes."""
    root = Path(ctd.__file__).parent
    return fingerprint(*((root / f).read_bytes() for f in ("collate.py", "align.py", "tokens.py")))


def rows_key(ds: datasets.Dataset, aligner: Aligner) -> str:
    """What aligned rows are a function of: the texts, both tokenizers, the windowing, the code."""
    return fingerprint(content_key(ds), tokenizer_key(aligner.teacher_tokenizer),
                       tokenizer_key(aligner.student_tokenizer), aligner.max_length,
                       aligner.windows, _code_key())


ROW_FEATURES = datasets.Features(
    {k: datasets.Sequence(datasets.Value("int32"))
     for k in ("teacher_ids", "teacher_chunks", "student_ids", "student_chunks")}
    | {k: datasets.Value("int64") for k in COUNTS} | {"problem": datasets.Value("string")}
)


def aligned_rows(ds: datasets.Dataset, aligner: Aligner) -> datasets.Dataset:
    """Every example tokenized on both sides, aligned and cut into windows
    (`Aligner.rows`), cached on disk under $CTD_CACHE/data.

    One process, the Rust tokenizers on every core: worker processes would each receive the
    two tokenizers pickled (~8 s before the first batch), and on two cores they lose to threads
    below ~100 MB of text (docs/benchmarks.md)."""
    key = rows_key(ds, aligner)
    path = cache_dir() / "data" / f"aligned-{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f for f in _FIELDS if f in ds.column_names]

    def rows(batch: dict, indices: list[int]) -> dict:
        n = len(batch[fields[0]])
        examples = [{f: batch[f][i] for f in fields} for i in range(n)]
        if "prompt" not in fields:
            examples = [{"text": ex["text"]} for ex in examples]
        out = aligner.rows(examples, first_document=indices[0])
        return {k: [r[k] for r in out] for k in ROW_FEATURES}

    with _tokenizer_threads():
        return ds.map(rows, batched=True, batch_size=512, with_indices=True,
                      remove_columns=ds.column_names, features=ROW_FEATURES,
                      cache_file_name=str(path), new_fingerprint=key,
                      desc="tokenizing and aligning")


@contextlib.contextmanager
def _tokenizer_threads():
    """Let the Rust tokenizers use every core for their batches (the CLI turns that off
    elsewhere: DataLoader workers fork, and forked tokenizers must not)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def row_stats(rows: datasets.Dataset) -> dict[str, object]:
    """`ctd.collate.stats` of cached rows."""
    columns = {k: np.asarray(rows[k]) for k in COUNTS}
    bad = np.flatnonzero(columns["unencodable"])
    return stats(columns, rows.select(bad[:3])["problem"] if len(bad) else [])


class DistillData(pl.LightningDataModule):
    """Training batches in a resumable, globally-counted order; validation batches in order.

    With `teacher_rows` (ctd.teacher_cache), the rows also carry the teacher's log-probs."""

    def __init__(self, teacher_tokenizer, student_tokenizer, config: DataConfig,
                 accumulate: int = 1,
                 teacher_rows: Callable[[dict[str, datasets.Dataset]],
                                        dict[str, datasets.Dataset]] | None = None):
        super().__init__()
        self.config, self.accumulate = config, accumulate
        self.aligner = Aligner(teacher_tokenizer, student_tokenizer, config.max_length,
                               config.windows, config.strict)
        self.teacher_rows = teacher_rows
        self.train_ds: datasets.Dataset | None = None
        self.stats: dict[str, dict] = {}

    def corpora(self) -> dict[str, datasets.Dataset]:
        """The training and validation documents."""
        c = self.config
        train = load_corpus(c.corpus, "train", c.text_field, c.sample_by)
        if c.max_documents is not None:
            train = train.select(range(min(c.max_documents, len(train))))
        val = load_corpus(c.val_corpus or c.corpus, "validation" if c.val_corpus is None
                          else "all", c.text_field, c.sample_by)
        return {"train": train, "validation": val.select(range(min(c.val_documents, len(val))))}

    def rows(self) -> dict[str, datasets.Dataset]:
        """Aligned rows of both splits (cached), with what was cut or skipped logged once."""
        out = {}
        for split, ds in self.corpora().items():
            out[split] = aligned_rows(ds, self.aligner)
            self.stats[split] = row_stats(out[split])
            _log_stats(split, self.stats[split])
        return out

    def setup(self, stage: str) -> None:
        if self.train_ds is not None:
            return
        rows = self.rows()
        if self.teacher_rows is not None:
            rows = self.teacher_rows(rows)
        self.train_ds, self.val_ds = rows["train"], rows["validation"]
        chunks = np.asarray(self.train_ds["num_chunks"])
        self.train_rows = np.flatnonzero(chunks > 0)
        self.counts = np.stack([chunks, np.asarray(self.train_ds["loss_tokens"])], 1)[
            self.train_rows]
        val_chunks = np.asarray(self.val_ds["num_chunks"])
        self.val_ds = self.val_ds.select(np.flatnonzero(val_chunks > 0))

    def _loader(self, ds: datasets.Dataset, **kwargs) -> DataLoader:
        collate = StepCollator(self.aligner.teacher_start, self.aligner.student_start)
        return DataLoader(RowReader(ds), num_workers=self.config.num_workers, collate_fn=collate,
                          persistent_workers=self.config.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        sampler = StepSampler(self.train_rows, self.counts, self.config.batch_size,
                              self.accumulate, t.world_size if t else 1,
                              t.global_rank if t else 0, self.config.seed)
        if t is not None:
            sampler.resume_at(t.global_step)
        return self._loader(self.train_ds, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t else (0, 1)
        shard = self.val_ds.select(range(rank, len(self.val_ds), world))
        return self._loader(shard, batch_size=self.config.val_batch_size)


def _log_stats(split: str, s: dict) -> None:
    log.info("%s: %d documents -> %d windows, %d chunks, %d bytes trained on; %d chunks dropped, "
             "%d cut from %d truncated documents", split, s["documents"], s["windows"],
             s["chunks"], s["bytes"], s["dropped_chunks"], s["truncated_chunks"],
             s["truncated_documents"])
    for side in ("teacher", "student"):
        if s[f"unencodable_{side}_documents"]:
            log.warning("%s: %d documents (%d bytes) skipped: the %s tokenizer cannot reproduce "
                        "them byte-exactly (e.g. %s)", split, s[f"unencodable_{side}_documents"],
                        s[f"unencodable_{side}_bytes"], side,
                        "; ".join(s["unencodable_examples"]))
