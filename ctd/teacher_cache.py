"""The teacher cache: the teacher's side of ALM, computed once and stored beside the rows.

ALM reads two numbers per teacher token: log p_T(token | prefix), and the log-probability that
the next token starts a word (what its debiasing uses). They depend only on the aligned rows
(corpus, tokenizers, windows) and the teacher (weights, dtype), so they are computed once and an
objective made of `alm` and `clm` trains without loading the teacher at all; validation reads the
teacher's bits per byte and chunk log-likelihoods from it too.

A cache is an ordinary `datasets` directory per split (the rows plus `teacher_logprobs` and
`teacher_boundary`, one value per teacher position, doc-start included) with
`ctd-teacher-cache.json` saying what it was built from. It can be built on a big machine
(`ctd teacher-cache --config ...`) and copied. A directory built from anything else is refused
with the command that rebuilds it; a build stopped at any point (kill -9 included) leaves
nothing under the final name, so it is rebuilt, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch

from ctd.data import content_key, fingerprint
from ctd.errors import CtdError
from ctd.io import atomic_dir, cache_dir, write_json
from ctd.losses.logprobs import (
    chunk_rows,
    hidden_states,
    output_head,
    token_logprobs,
    word_start_mask,
)
from ctd.report import progress
from ctd.zoo import resolve_model

META = "ctd-teacher-cache.json"
_FEATURE = datasets.Sequence(datasets.Value("float32"))


def weights_key(model_dir: str) -> str:
    """A hash of a model directory's weight files (cached by path, size and mtime: hashing a
    GB takes a second or two)."""
    path = Path(model_dir)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return model_dir  # a hub id: its name is all we know
    memo_path = cache_dir() / "weights-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        stamp = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if stamp not in memo:
            file_hash = hashlib.sha1()
            with f.open("rb") as src:
                while block := src.read(1 << 24):
                    file_hash.update(block)
            memo[stamp] = file_hash.hexdigest()
        h.update(memo[stamp].encode())
    try:
        write_json(memo_path, memo)
    except OSError:
        pass
    return h.hexdigest()[:16]


class TeacherCache:
    """Adds the teacher's columns to aligned rows, from the cache or by building it.

    Args:
        location: "auto" ($CTD_CACHE/teacher/<key>/<split>) or a directory (<dir>/<split>).
        teacher: the teacher as named in the config.
        dtype: the teacher's dtype (part of what the values depend on).
        tokenizer: the teacher's tokenizer.
        load: loads the teacher; called only when something must be built.
        splits: the splits that need the teacher's columns.
        rebuild: the command that rebuilds the cache (said when a directory is refused).
    """

    def __init__(self, location: str, teacher: str, dtype: torch.dtype, tokenizer,
                 load: Callable[[], torch.nn.Module], splits: tuple[str, ...],
                 rebuild: str, batch_size: int = 8, show_progress: bool = True):
        self.location, self.dtype, self.tokenizer = location, dtype, tokenizer
        self.load, self.splits, self.rebuild = load, splits, rebuild
        self.batch_size, self.show_progress = batch_size, show_progress
        where = resolve_model(teacher)
        self.teacher = {"model": teacher, "weights": weights_key(where),
                        "dtype": str(dtype).removeprefix("torch.")}

    def meta(self, rows: datasets.Dataset) -> dict:
        """What the cached values are a function of."""
        return {"format": 1, "rows": content_key(rows), "teacher": self.teacher}

    def path(self, split: str, meta: dict) -> Path:
        if self.location == "auto":
            return cache_dir() / "teacher" / fingerprint(meta) / split
        return Path(self.location).expanduser().resolve() / split

    def __call__(self, rows: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        out, todo = dict(rows), {}
        for split in self.splits:
            meta = self.meta(rows[split])
            path = self.path(split, meta)
            if (path / META).exists():
                out[split] = self._load(path, meta)
            else:
                todo[split] = (path, meta)
        if todo:
            teacher = self.load()
            for split, (path, meta) in todo.items():
                with atomic_dir(path, overwrite=path.exists()) as tmp:
                    with_teacher(rows[split], teacher, self.tokenizer, self.batch_size,
                                 self.show_progress, split).save_to_disk(str(tmp))
                    write_json(tmp / META, meta)
                out[split] = self._load(path, meta)
            del teacher
        return out

    def _load(self, path: Path, meta: dict) -> datasets.Dataset:
        saved = json.loads((path / META).read_text())
        if saved != meta:
            diff = sorted(k for k in meta if saved.get(k) != meta[k])
            raise CtdError(f"teacher cache {path.parent} was built for another configuration "
                           f"(differs in: {', '.join(diff)}); rebuild it: {self.rebuild}")
        return datasets.load_from_disk(str(path))


@torch.inference_mode()
def with_teacher(rows: datasets.Dataset, teacher, tokenizer, batch_size: int = 8,
                 show_progress: bool = True, name: str = "") -> datasets.Dataset:
    """`rows` plus the teacher's token log-probs and word-boundary log-probs per window
    (float32, one per teacher position, doc-start included), computed in batches of
    similar lengths."""
    from ctd.tokens import doc_start_id

    ids = rows["teacher_ids"]
    start = doc_start_id(tokenizer)
    words = word_start_mask(tokenizer)
    head = output_head(teacher)
    chunk = chunk_rows(teacher.get_output_embeddings().weight.shape[0])
    device = next(teacher.parameters()).device
    logprobs: list[np.ndarray] = [np.zeros(0, np.float32)] * len(ids)
    boundary: list[np.ndarray] = [np.zeros(0, np.float32)] * len(ids)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    total = sum(1 + len(x) for x in ids)
    t0, done = time.perf_counter(), 0
    teacher.eval()
    with progress(disable=not show_progress) as bar:
        task = bar.add_task(f"teacher cache {name}".strip(), total=total, info="")
        for lo in range(0, len(order), batch_size):
            picked = order[lo : lo + batch_size]
            width = 1 + max(len(ids[i]) for i in picked)
            batch = torch.zeros(len(picked), width, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for r, i in enumerate(picked):
                batch[r, 0] = start
                batch[r, 1 : 1 + len(ids[i])] = torch.as_tensor(ids[i])
                mask[r, : 1 + len(ids[i])] = 1
            batch, mask = batch.to(device), mask.to(device)
            lp, bnd = token_logprobs(hidden_states(teacher, batch, mask), head, batch, words, chunk)
            lp, bnd = lp.float().cpu().numpy(), bnd.float().cpu().numpy()
            for r, i in enumerate(picked):
                n = 1 + len(ids[i])
                logprobs[i], boundary[i] = lp[r, :n].copy(), bnd[r, :n].copy()
            done += int(mask.sum())
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done, info=f"{rate:,.0f} tokens/s")
    return (rows.add_column("teacher_logprobs", logprobs, feature=_FEATURE)
            .add_column("teacher_boundary", boundary, feature=_FEATURE))

