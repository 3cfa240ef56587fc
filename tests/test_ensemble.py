"""The ensemble is a causal LM over the shared vocabulary; generation works for both."""

from __future__ import annotations

import pytest
import torch

from ctd.ensemble import Ensemble
from ctd.errors import CtdError
from ctd.evaluate import bits_per_byte, extract_answer, greedy_generate
from tests.tiny import tiny_model

TEXTS = ["An ensemble averages probabilities.", "Jensen: -log of a mean is at most the mean -log."]


def test_mixture_of_probabilities_is_exact(smol_tok):
    a, b = tiny_model(smol_tok, seed=1), tiny_model(smol_tok, "gemma3", seed=2)
    ids = torch.tensor([smol_tok("hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        mixed = Ensemble([a, b], weights=[3, 1])(ids).logits
        expected = (0.75 * a(ids).logits.softmax(-1) + 0.25 * b(ids).logits.softmax(-1)).log()
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_ensemble_bpb_at_most_the_members_mean(smol_tok):
    a, b = tiny_model(smol_tok, seed=1), tiny_model(smol_tok, seed=2)
    scores = [bits_per_byte(m, smol_tok, TEXTS, progress=False).bpb for m in (a, b, Ensemble([a, b]))]
    assert scores[2] <= (scores[0] + scores[1]) / 2 + 1e-9
    same = bits_per_byte(Ensemble([a, a]), smol_tok, TEXTS, progress=False).bpb
    assert same == pytest.approx(scores[0], rel=1e-6)


def test_logit_mode_and_bad_members(smol_tok, gemma_tok):
    a = tiny_model(smol_tok, seed=1)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = Ensemble([a, a], mode="logits")(ids).logits
    torch.testing.assert_close(out, a(ids).logits.log_softmax(-1))
    with pytest.raises(CtdError, match="different vocabularies"):
        Ensemble([a, tiny_model(gemma_tok)])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_generate_matches_transformers_generate(arch, smol_tok):
    model = tiny_model(smol_tok, arch, seed=3)
    prompts = ["Once upon a time", "The answer is 42 because"]
    ours = greedy_generate(model, smol_tok, prompts, max_new_tokens=6, progress=False)
    for prompt, text in zip(prompts, ours):
        ids = torch.tensor([[0] + smol_tok(prompt, add_special_tokens=False)["input_ids"]])
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert text == smol_tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    ens = greedy_generate(Ensemble([model, model]), smol_tok, prompts, 6, progress=False)
    assert ens == ours


@pytest.mark.parametrize("text,answer", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234 apples", "1234"), ("it is 12.0", "12"),
    ("no number here", None), ("first 3 then 5", "5"), ("#### -4\nthen 9", "-4"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_multiple_choice_scores_each_choice_as_a_continuation(smol_tok):
    from ctd.evaluate import choice_nll, multiple_choice

    a, b = tiny_model(smol_tok, seed=1), tiny_model(smol_tok, "gemma3", seed=2)
    context, choices = "The capital of France is", [" Paris", " a city in Europe", " 42"]
    got = choice_nll(a, smol_tok, context, choices)
    ctx = smol_tok(context, add_special_tokens=False)["input_ids"]
    for choice, nll in zip(choices, got):  # one unpadded forward per choice, by hand
        ids = torch.tensor([[0, *ctx, *smol_tok(choice, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            logp = a(ids).logits.log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
        assert nll == pytest.approx(-float(logp[len(ctx):].sum()), rel=1e-4)
    per_byte = [n / len(c.encode()) for n, c in zip(got, choices)]
    assert multiple_choice(a, smol_tok, context, choices) == per_byte.index(min(per_byte))
    # the ensemble is scored the same way; of one model twice it is that model
    assert choice_nll(Ensemble([a, a]), smol_tok, context, choices) == pytest.approx(got, rel=1e-5)
    mixed = choice_nll(Ensemble([a, b]), smol_tok, context, choices)
    alone = choice_nll(b, smol_tok, context, choices)
    # per token (p+q)/2 >= sqrt(pq), so a choice's mixed NLL is at most its members' mean
    assert all(m <= (x + y) / 2 + 1e-6 for m, x, y in zip(mixed, got, alone))
