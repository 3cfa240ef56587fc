"""A transplanted model reads a text the same whichever start token a tool puts first."""

from __future__ import annotations

import numpy as np
import pytest

from ctd.corpora import load_corpus, take_bytes
from ctd.evaluate import window_nll
from ctd.harness import bpb, rolling_nll
from ctd.tokens import encode
from ctd.transplant.vocab import match_vocab, start_tokens


def test_start_tokens_of_the_packaged_tokenizers(real_tokenizers):
    smol, gemma, qwen = (real_tokenizers[n] for n in ("smollm2-135m", "gemma3-270m",
                                                      "qwen2.5-coder-0.5b"))
    assert start_tokens(smol) == {0: ["document start"], 1: ["bos", "chat start"], 2: ["eos"]}
    assert start_tokens(gemma) == {2: ["document start", "bos"], 1: ["eos"]}
    assert start_tokens(qwen) == {151643: ["document start", "bos"], 151644: ["chat start"],
                                  151645: ["eos"]}


def test_every_start_token_gets_the_base_start_row(gemma_tok, smol_tok, qwen_tok):
    for new in (smol_tok, qwen_tok):
        match = match_vocab(gemma_tok, new)
        rows = {s["token"]: (s["base_token"], s["kind"]) for s in match.specials}
        assert rows["<|endoftext|>"] == rows["<|im_start|>"] == ("<bos>", "start")
        assert rows["<|im_end|>"] == ("<eos>", "role")  # still predicted where a turn ends
        assert any("<|im_end|>" in w for w in match.warnings)
    # a base that starts texts without a BOS of its own keeps exact matches and gets no warning
    match = match_vocab(qwen_tok, smol_tok)
    assert {s["kind"] for s in match.specials} == {"exact"} and not match.warnings
    # the reverse pair: Gemma's <bos> (its document start and bos) onto SmolLM2's separator
    rows = {s["token"]: s["base_token"] for s in match_vocab(smol_tok, gemma_tok).specials}
    assert rows["<bos>"] == "<|endoftext|>" and rows["<start_of_turn>"] == "<|im_start|>"


@pytest.mark.real
def test_transplant_reads_the_same_after_every_start_and_still_chats(gemma_tok, smol_tok):
    """Gemma-3-270M onto SmolLM2's tokenizer: before this rule a text opened by `<|im_start|>`
    (lm-eval's prefix, the chat template's first token) read 69% worse than one opened by
    `<|endoftext|>`, and assistant turns in the chat template 31% worse than plain text."""
    from ctd.transplant.run import transplant_model
    from ctd.zoo import load_model

    model = load_model("gemma3-270m")
    transplant_model(model, gemma_tok, smol_tok, "fvt")
    rows = load_corpus("wiki-en", "validation").to_list()
    texts = take_bytes([r["text"] for r in rows], 1500)
    scores = {t: bpb(rolling_nll(model, smol_tok, texts, start=t), texts)
              for t in start_tokens(smol_tok)}
    assert scores[1] == pytest.approx(scores[0], rel=0.02)  # bos and chat start
    assert scores[2] > 1.2 * scores[0]  # the eos keeps its role (see ctd.transplant.vocab)

    # assistant turns in SmolLM2's chat template read about as well as the same text alone
    # (after this rule 1.04x and 1.02x here; before it 1.45x and 1.48x)
    chat = plain = 0.0
    for row in rows[len(texts) : len(texts) + 2]:
        content = row["text"][:600]
        prefix = smol_tok.apply_chat_template(
            [{"role": "user", "content": f"Tell me about {row['title']}."}],
            add_generation_prompt=True, tokenize=False)
        p = smol_tok(prefix, add_special_tokens=False)["input_ids"]
        c = encode(smol_tok, [content])[0].ids.tolist()
        chat += float(window_nll(model, [np.asarray(p + c)], 2, [len(p)])[0])
        plain += rolling_nll(model, smol_tok, [content])[0]
    assert chat < 1.15 * plain
