"""Bits per byte, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctd.errors import CtdError
from ctd.evaluate import bits_per_byte, windows
from ctd.zoo import load_model
from tests.tiny import tiny_model

TEXTS = [
    "The capital of France is Paris. It has 2,165,423 inhabitants.",
    "Tokenizers disagree: café, naïve, 東京, emoji 🙂 and tabs\tand\nnewlines.",
    "def f(x):\n    return x ** 2  # squares\n",
]


def uniform_model(tokenizer, arch: str):
    """A model whose logits are all equal: every token costs exactly log(V) nats."""
    model = tiny_model(tokenizer, arch, tied=False)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return model


@pytest.mark.parametrize("arch,tok_name", [("llama", "smol_tok"), ("gemma3", "gemma_tok")])
def test_uniform_logits_give_log2_vocab_per_token(arch, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    result = bits_per_byte(uniform_model(tok, arch), tok, TEXTS, window=32, progress=False)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert result.tokens == tokens
    assert result.bytes == n_bytes
    assert result.bpb == pytest.approx(math.log2(len(tok)) * tokens / n_bytes, rel=1e-6)


def test_two_tokenizers_are_charged_for_the_same_bytes(smol_tok, gemma_tok, qwen_tok):
    results = [
        bits_per_byte(tiny_model(tok, "llama"), tok, TEXTS, progress=False)
        for tok in (smol_tok, gemma_tok, qwen_tok)
    ]
    assert {r.bytes for r in results} == {sum(len(t.encode()) for t in TEXTS)}
    assert len({r.tokens for r in results}) == 3  # the tokenizations really differ


def test_windowing_keeps_bytes_and_tokens(smol_tok):
    model = tiny_model(smol_tok, "llama")
    short = bits_per_byte(model, smol_tok, TEXTS, window=8, progress=False)
    long = bits_per_byte(model, smol_tok, TEXTS, window=512, progress=False)
    assert (short.bytes, short.tokens) == (long.bytes, long.tokens)
    assert short.windows > long.windows == len(TEXTS)
    assert short.nll_nats != long.nll_nats  # less context, different loss


def test_windows_cover_every_token_once_after_a_start_token():
    ids = np.arange(100, 123)
    ws = windows(ids, start=7, window=5)
    assert all(w[0] == 7 and len(w) <= 5 for w in ws)
    assert np.array_equal(np.concatenate([w[1:] for w in ws]), ids)


def test_bpb_matches_a_direct_forward_pass(smol_tok):
    model = tiny_model(smol_tok, "llama")
    text = TEXTS[0]
    ids = [0] + smol_tok(text, add_special_tokens=False)["input_ids"]  # 0 = <|endoftext|>
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    result = bits_per_byte(model, smol_tok, [text], progress=False)
    assert result.bpb == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)


def test_window_beyond_context_is_refused(smol_tok):
    with pytest.raises(CtdError, match="context"):
        bits_per_byte(tiny_model(smol_tok, "llama"), smol_tok, TEXTS, window=4096, progress=False)


@pytest.mark.real
@pytest.mark.parametrize("name,low,high", [
    ("smollm2-135m", 0.5, 1.4), ("gemma3-270m", 0.5, 1.4), ("qwen2.5-coder-0.5b", 0.5, 1.4),
])
def test_real_models_score_text_sanely(name, low, high, real_tokenizers):
    text = ("Paris is the capital and largest city of France. With an estimated population of "
            "more than two million residents, it is the centre of the Île-de-France region.")
    result = bits_per_byte(load_model(name), real_tokenizers[name], [text], progress=False)
    assert low < result.bpb < high, result


def test_a_local_file_is_scored_whole_unless_a_split_is_asked(tmp_path, smol_tok, capsys):
    """`ctd eval --corpus notes.txt`: a user's own text is scored as given (a 3-paragraph file
    has no "validation" split to speak of); `--split` still selects one."""
    import json

    from ctd.cli import main

    tiny_model(smol_tok, "llama").save_pretrained(tmp_path / "m")
    smol_tok.save_pretrained(tmp_path / "m")
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(TEXTS))
    main(["eval", "--model", str(tmp_path / "m"), "--corpus", str(notes), "--json",
          str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["documents"] == 3 and result["bytes"] == sum(len(t.encode()) for t in TEXTS)
