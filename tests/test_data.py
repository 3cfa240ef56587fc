"""The step layout behind exact global normalisation and exact resume, and prompt/response
masks from a local dataset."""

from __future__ import annotations

import json

import numpy as np
import torch

from ctd.config import DataConfig
from ctd.data import DistillData, StepSampler


def _items(sampler: StepSampler) -> list[list[tuple[int, int, int]]]:
    return list(sampler)


def test_ranks_and_micro_batches_partition_the_global_batch():
    counts = np.arange(40).reshape(20, 2)
    single = _items(StepSampler(counts, 4, 1, 1, 0, seed=3))
    ranks = [_items(StepSampler(counts, 1, 2, 2, r, seed=3)) for r in range(2)]
    for step, big in enumerate(single):
        parts = [item for r in ranks for item in r[2 * step : 2 * step + 2]]
        assert sorted(i for p in parts for i in p) == sorted(big)  # same examples, same totals
        chunks, tokens = counts[[i for i, _, _ in big]].sum(0)
        assert {(c, t) for p in parts for _, c, t in p} == {(chunks, tokens)}


def test_order_is_seeded_and_resumable():
    counts = np.ones((24, 2), np.int64)
    a = StepSampler(counts, 2, 2, 1, 0, seed=0)
    a.set_epoch(1)
    full = _items(a)
    b = StepSampler(counts, 2, 2, 1, 0, seed=0)
    b.set_epoch(1)
    b.resume_at(global_step=6 * 1 + 2)  # 6 steps per epoch: step 2 of epoch 1
    assert _items(b) == full[2 * 2 :]
    assert _items(b) == full  # the skip applies once
    a.set_epoch(2)
    assert _items(a) != full
    c = StepSampler(counts, 2, 2, 1, 0, seed=1)
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


def test_cached_rows_batch_like_the_collator(tmp_path, smol_tok, gemma_tok):
    """Training and validation batches built from the cached aligned rows are exactly what the
    collator gives for the same examples read directly (the cache changes nothing but speed)."""
    texts = [f"Paragraph {i}: naïve café №{i} — {'x' * (i % 7)} 🤗 done." for i in range(24)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    dm = DistillData(gemma_tok, smol_tok, DataConfig(corpus=str(path), val_corpus=str(path),
                                                     batch_size=4, max_length=12))
    dm.setup("fit")
    order = next(iter(dm.train_dataloader().batch_sampler))
    got = next(iter(dm.train_dataloader()))
    want = dm.collator([{"text": texts[i]} for i, _, _ in order])
    val = next(iter(dm.val_dataloader()))
    want_val = dm.collator([{"text": t} for t in texts[: len(val["num_chunks"])]])
    for key, value in want.items():
        assert torch.equal(got[key], value), key
        assert torch.equal(val[key], want_val[key]), key
    assert int(got["num_chunks"].sum()) > 0 and int(want["num_chunks"].min()) >= 0
