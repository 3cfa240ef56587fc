"""The step layout behind exact global normalisation and exact resume, and prompt/response
masks from a local dataset."""

from __future__ import annotations

import json

import numpy as np
import torch

from ctd.collate import pad
from ctd.config import DataConfig
from ctd.data import DistillData, StepSampler


def _items(sampler: StepSampler) -> list[list[tuple[int, int, int]]]:
    return list(sampler)


def test_ranks_and_micro_batches_partition_the_global_batch():
    counts = np.arange(40).reshape(20, 2)
    rows = np.arange(100, 120)  # the trainable rows' ids in the dataset
    single = _items(StepSampler(rows, counts, 4, 1, 1, 0, seed=3))
    ranks = [_items(StepSampler(rows, counts, 1, 2, 2, r, seed=3)) for r in range(2)]
    for step, big in enumerate(single):
        parts = [item for r in ranks for item in r[2 * step : 2 * step + 2]]
        assert sorted(i for p in parts for i in p) == sorted(big)  # same examples, same totals
        chunks, tokens = counts[[i - 100 for i, _, _ in big]].sum(0)
        assert {(c, t) for p in parts for _, c, t in p} == {(chunks, tokens)}


def test_order_is_seeded_and_resumable():
    counts = np.ones((24, 2), np.int64)
    rows = np.arange(24)
    a = StepSampler(rows, counts, 2, 2, 1, 0, seed=0)
    a.set_epoch(1)
    full = _items(a)
    b = StepSampler(rows, counts, 2, 2, 1, 0, seed=0)
    b.set_epoch(1)
    b.resume_at(global_step=6 * 1 + 2)  # 6 steps per epoch: step 2 of epoch 1
    assert _items(b) == full[2 * 2 :]
    assert _items(b) == full  # the skip applies once
    a.set_epoch(2)
    assert _items(a) != full
    c = StepSampler(rows, counts, 2, 2, 1, 0, seed=1)
    c.set_epoch(1)
    assert _items(c) != full


def test_prompt_response_dataset_masks_the_prompt(tmp_path, smol_tok, gemma_tok):
    rows = [{"text": f"Question: what is {i}+1?\nAnswer: {i}+1 = {i + 1}. The answer is {i + 1}",
             "prompt": f"Question: what is {i}+1?\nAnswer: ",
             "response": f"{i}+1 = {i + 1}. The answer is {i + 1}"} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = DistillData(smol_tok, gemma_tok, DataConfig(corpus=str(path), batch_size=4,
                                                     max_length=64))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    mask, ids = batch["student_loss_mask"], batch["student_input_ids"]
    for row in range(len(ids)):
        scored = gemma_tok.decode(ids[row][mask[row]])
        assert "Question" not in scored and "The answer is" in scored
    assert int(batch["global_chunks"]) == int(batch["num_chunks"].sum())
    assert int(batch["global_tokens"]) == int(mask.sum())


def test_cached_rows_batch_like_the_aligner(tmp_path, smol_tok, gemma_tok):
    """Training and validation batches built from the cached aligned rows are exactly what the
    aligner gives for the same documents read directly (the cache changes nothing but speed),
    windows included."""
    texts = [f"Paragraph {i}: naïve café №{i} — {'x' * (i % 7)} 🤗 done." for i in range(24)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    dm = DistillData(gemma_tok, smol_tok, DataConfig(corpus=str(path), val_corpus=str(path),
                                                     batch_size=4, max_length=12))
    dm.setup("fit")
    start = dm.aligner.teacher_start, dm.aligner.student_start
    order = next(iter(dm.train_dataloader().batch_sampler))
    got = next(iter(dm.train_dataloader()))
    rows = dm.aligner.rows([{"text": t} for t in dm.corpora()["train"]["text"]])
    assert len(rows) > len(dm.corpora()["train"])  # max_length 12 cuts documents into windows
    want = pad([rows[i] for i, _, _ in order], *start)
    val = next(iter(dm.val_dataloader()))
    val_rows = [r for r in dm.aligner.rows([{"text": t} for t in texts]) if r["num_chunks"]]
    want_val = pad(val_rows[: len(val["num_chunks"])], *start)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
        assert torch.equal(val[key], want_val[key]), key
    assert int(got["num_chunks"].sum()) > 0 and int(want["num_chunks"].min()) > 0
    assert dm.stats["train"]["bytes"] == sum(len(t.encode()) for t in dm.corpora()["train"]["text"])


def test_row_cache_key_follows_the_selected_documents():
    """The aligned-rows cache is keyed by the rows a dataset selects, not the table under it:
    the first 8 documents of a corpus and the whole corpus never share cached rows."""
    import datasets

    from ctd.data import content_key

    ds = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(10)]})
    assert content_key(ds.select(range(8))) != content_key(ds)
    assert content_key(ds.select([0, 1])) != content_key(ds.select([0, 2]))
    assert content_key(ds.select(range(8))) == content_key(ds.select(range(8)))
