"""Losses: golden distances, exactness of the chunked math, ALM's zero at identity, gradients,
and the global normalisation that makes accumulation equal one big batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from ctd.collate import Aligner
from ctd.errors import CtdError
from ctd.losses import DistillObjective, LossSpec, hidden_states, output_head
from ctd.losses.alm import DISTANCES, alm_loss, chunk_last, chunk_sum, merge_chunks
from ctd.losses.kd import vocab_map
from ctd.losses.logprobs import _LogitStats, token_logprobs
from ctd.losses.uld import uld_loss
from ctd.tokens import byte_vocab
from tests.tiny import tiny_model

TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog. Ünïcödé 🤗, naïve café!"},
    {"prompt": "Question: what is 2+2?\nAnswer:", "response": " It is 4, of course."},
]

# (l_T, l_S) = (-1, -2); values from the Bernoulli formulas with p = e^(l/tau), by hand.
GOLDEN = {
    ("binary_ce", 1.0): 0.16986028819784632,  # p ln(p/q) + (1-p) ln((1-p)/(1-q))
    ("binary_ce", 100.0): 0.003053195109319125,
    ("reverse_binary_kl", 1.0): 0.1355310450741522,
    ("abs", 1.0): 1.0,
    ("binary_kl_temp_limit", 1.0): 1 - 0.6931471805599453,  # 1 + (-1) ln 2
}


@pytest.mark.parametrize(("distance", "tau"), list(GOLDEN))
def test_distance_golden_values(distance, tau):
    got = DISTANCES[distance](torch.tensor([-1.0], dtype=torch.float64),
                              torch.tensor([-2.0], dtype=torch.float64), tau)
    assert got.item() == pytest.approx(GOLDEN[distance, tau], rel=1e-4)


@pytest.mark.parametrize("distance", list(DISTANCES))
def test_distance_zero_when_equal(distance):
    ll = torch.tensor([-3.0, -0.5, 0.0, -40.0], dtype=torch.float64)
    assert torch.equal(DISTANCES[distance](ll, ll.clone(), 100.0), torch.zeros(4, dtype=torch.float64))


def _chunks():
    # two examples; ids -1 are doc-start/padding; teacher and student cut the text differently
    t = torch.tensor([[-1, 0, 0, 1, 2, 2, 3], [-1, 0, 1, 1, -1, -1, -1]])
    s = torch.tensor([[-1, 0, 1, 1, 2, 3, -1], [-1, 0, 0, 1, -1, -1, -1]])
    return t, s


def test_chunk_sum_and_last():
    t, _ = _chunks()
    v = torch.arange(14, dtype=torch.float64).view(2, 7)
    assert chunk_sum(v, t, 4).tolist() == [[3, 3, 9, 6], [8, 19, 0, 0]]
    assert chunk_last(t, 4).tolist() == [[2, 3, 5, 6], [1, 3, -1, -1]]


def test_merge_by_space_prob_joins_open_chunks():
    t, s = _chunks()
    bnd = torch.log(torch.tensor([[0.5] * 7, [0.01] * 7]))
    bnd[0, 3] = -10.0  # chunk 1 of example 0 does not close: it joins chunk 2
    mt, ms = merge_chunks(t, s, bnd, gamma=0.1)
    assert mt.tolist() == [[-1, 0, 0, 1, 1, 1, 2], [-1, 0, 0, 0, -1, -1, -1]]
    assert ms.tolist() == [[-1, 0, 1, 1, 1, 2, -1], [-1, 0, 0, 0, -1, -1, -1]]


@pytest.mark.parametrize("distance", list(DISTANCES))
def test_alm_gradcheck_float64(distance):
    torch.manual_seed(0)
    t, s = _chunks()
    t_lp = -torch.rand(2, 7, dtype=torch.float64) * 3
    t_bnd = -torch.rand(2, 7, dtype=torch.float64) * 3
    s_lp = (-torch.rand(2, 7, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    s_bnd = (-torch.rand(2, 7, dtype=torch.float64) * 3 - 0.1).requires_grad_()

    def f(s_lp, s_bnd):
        return alm_loss(t_lp, s_lp, t, s, distance, 2.0, t_bnd, s_bnd, gamma=0.3)

    assert torch.autograd.gradcheck(f, (s_lp, s_bnd))


def test_chunked_logprobs_equal_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 37, bias=False).double()
    hidden = torch.randn(3, 11, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 37, (3, 11))
    words = torch.rand(37) < 0.4
    capped = lambda h: torch.tanh(head(h) / 5.0) * 5.0  # noqa: E731 (Gemma-2 soft-capping)
    u, v = torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)
    for fn in (head, capped):
        logp = fn(hidden).log_softmax(-1)
        want_lp = torch.nn.functional.pad(logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0], (1, 0))
        want_bnd = logp.masked_fill(~words, float("-inf")).logsumexp(-1)
        (gw,) = torch.autograd.grad((u * want_lp).sum() + (v * want_bnd).sum(), hidden,
                                    retain_graph=True)
        (gw_lp,) = torch.autograd.grad((u * want_lp).sum(), hidden)
        for chunk, recompute in ((1, True), (4, False), (1000, True), (1000, False)):
            lp, bnd = token_logprobs(hidden, fn, ids, words, chunk=chunk, recompute=recompute)
            (g,) = torch.autograd.grad((u * lp).sum() + (v * bnd).sum(), hidden)
            torch.testing.assert_close(lp, want_lp)
            torch.testing.assert_close(bnd, want_bnd)
            torch.testing.assert_close(g, gw)
            lp, none = token_logprobs(hidden, fn, ids, None, chunk=chunk, recompute=recompute)
            (g,) = torch.autograd.grad((u * lp).sum(), hidden)
            assert none is None
            torch.testing.assert_close(lp, want_lp)
            torch.testing.assert_close(g, gw_lp)
    logits = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 37, (5, 1))
    assert torch.autograd.gradcheck(lambda z: _LogitStats.apply(z, target, words), (logits,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logprobs_without_gradients_equal_those_with(dtype):
    """Inference (teacher cache, live teacher, evaluation) writes each chunk's logits and
    exponentials into reused buffers: the same numbers to the bit as the autograd path, chunks
    of any size (the last one shorter) included, for a plain linear head (its GEMM into the
    buffer) and any other (Gemma-2's soft-capping)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 301, bias=False).to(dtype)
    capped = lambda h: torch.tanh(head(h) / 5.0) * 5.0  # noqa: E731
    hidden, ids = torch.randn(3, 23, 16, dtype=dtype), torch.randint(0, 301, (3, 23))
    words = torch.rand(301) < 0.4
    for fn, chunk in itertools.product((head, capped), (1, 8, 1000)):
        want = token_logprobs(hidden.requires_grad_(), fn, ids, words, chunk=chunk)
        with torch.inference_mode():
            got = token_logprobs(hidden.detach(), fn, ids, words, chunk=chunk)
        assert all(torch.equal(a.detach(), b) for a, b in zip(want, got, strict=True))


@pytest.mark.parametrize("case", ["autocast", "hook"])
def test_inference_logprobs_call_a_head_that_is_not_a_bare_gemm(case):
    """Under autocast the head's GEMM runs in autocast's precision, and a head's hooks (how
    DeepSpeed ZeRO-3 gathers a partitioned weight) run: inference must call the head then,
    and give what the autograd path gives."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 301, bias=False)
    if case == "hook":
        head.register_forward_hook(lambda module, args, out: out * 2.0)
    hidden, ids = torch.randn(3, 23, 16), torch.randint(0, 301, (3, 23))
    words = torch.rand(301) < 0.4
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        want = token_logprobs(hidden.requires_grad_(), head, ids, words, chunk=8)
        with torch.inference_mode():
            got = token_logprobs(hidden.detach(), head, ids, words, chunk=8)
    assert all(torch.equal(a.detach(), b) for a, b in zip(want, got, strict=True))


def test_uld_matches_direct_implementation():
    torch.manual_seed(0)
    th, sh = torch.randn(2, 6, 4), torch.randn(2, 5, 3, requires_grad=True)
    t_head, s_head = torch.nn.Linear(4, 7), torch.nn.Linear(3, 5)
    t_chunks = torch.tensor([[-1, 0, 1, 1, 2, -1], [-1, 0, 1, 2, 3, 4]])
    s_chunks = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3]])
    s_mask = s_chunks >= 0
    got = uld_loss(th, sh, t_head, s_head, t_chunks, s_chunks, s_mask, chunk=4)
    got_chunked = uld_loss(th, sh, t_head, s_head, t_chunks, s_chunks, s_mask, chunked=True)

    def direct(pairs):
        total = 0.0
        for b, i, j in pairs:  # predicting positions: one before the paired targets
            pt = sorted(t_head(th[b, i - 1]).softmax(-1).tolist(), reverse=True)
            ps = sorted(s_head(sh[b, j - 1]).softmax(-1).tolist(), reverse=True)
            ps += [0.0] * (len(pt) - len(ps))
            total += sum(abs(x - y) for x, y in zip(pt, ps, strict=True))
        return total

    # k-th response token with k-th: example 0 has 4 teacher / 4 student, example 1 5 / 4
    positional = [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 4, 4)] + [(1, k, k) for k in range(1, 5)]
    by_chunk = [(0, 1, 1), (0, 2, 3), (0, 4, 4)] + [(1, k, k) for k in range(1, 5)]
    assert got.item() == pytest.approx(direct(positional), rel=1e-5)
    assert got_chunked.item() == pytest.approx(direct(by_chunk), rel=1e-5)
    got.backward()
    assert sh.grad is not None and torch.isfinite(sh.grad).all()


def _objective_run(teacher, student, t_tok, s_tok, names, batch, **kw):
    obj = DistillObjective([LossSpec(n, **kw) for n in names], t_tok, s_tok)
    with torch.inference_mode():
        th = hidden_states(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    sh = hidden_states(student, batch["student_input_ids"], batch["student_attention_mask"])
    out = obj(batch, sh, output_head(student), th, output_head(teacher),
              int(batch["num_chunks"].sum()), int(batch["student_loss_mask"].sum()))
    student.zero_grad()
    out["loss"].backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return out, grad


@pytest.mark.parametrize("distance", list(DISTANCES))
def test_alm_identical_teacher_and_student_is_zero(smol_tok, distance):
    model = tiny_model(smol_tok, "llama")
    batch = Aligner(smol_tok, smol_tok, max_length=64).batch(TEXTS)
    out, grad = _objective_run(model, model, smol_tok, smol_tok, ["alm"], batch, distance=distance)
    assert out["alm"].item() == 0.0
    assert grad.abs().max().item() < 1e-6


def test_alm_positive_when_models_differ(smol_tok, gemma_tok):
    batch = Aligner(smol_tok, smol_tok, max_length=64).batch(TEXTS)
    out, grad = _objective_run(tiny_model(smol_tok, seed=0), tiny_model(smol_tok, seed=1),
                               smol_tok, smol_tok, ["alm"], batch)
    assert out["alm"].item() > 0 and grad.abs().max().item() > 0
    batch = Aligner(gemma_tok, smol_tok, max_length=64).batch(TEXTS)
    out, grad = _objective_run(tiny_model(gemma_tok, "gemma3"), tiny_model(smol_tok, "qwen2"),
                               gemma_tok, smol_tok, ["alm", "clm"], batch)
    assert out["alm"].item() > 0 and out["clm"].item() > 0 and grad.abs().max().item() > 0


def test_global_normalisation_gives_the_big_batch_gradient(llama_spm_tok, smol_tok):
    teacher, student = tiny_model(llama_spm_tok, "llama"), tiny_model(smol_tok, "llama")
    collate = Aligner(llama_spm_tok, smol_tok, max_length=64).batch
    big = collate(TEXTS)
    parts = [collate([ex]) for ex in TEXTS]
    chunks, tokens = int(big["num_chunks"].sum()), int(big["student_loss_mask"].sum())
    obj = DistillObjective([LossSpec("alm"), LossSpec("clm", weight=0.5)], llama_spm_tok, smol_tok)

    def grads(batches):
        student.zero_grad()
        for b in batches:
            with torch.inference_mode():
                th = hidden_states(teacher, b["teacher_input_ids"], b["teacher_attention_mask"])
            sh = hidden_states(student, b["student_input_ids"], b["student_attention_mask"])
            obj(b, sh, output_head(student), th, output_head(teacher), chunks, tokens)["loss"].backward()
        return torch.cat([p.grad.flatten().clone() for p in student.parameters()])

    torch.testing.assert_close(grads(parts), grads([big]), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("names", [["alm_hidden"], ["uld"], ["uld_chunked"], ["kd_shared"]])
def test_baselines_zero_at_identity_and_positive_otherwise(smol_tok, names):
    batch = Aligner(smol_tok, smol_tok, max_length=64).batch(TEXTS)
    model = tiny_model(smol_tok)
    out, _ = _objective_run(model, model, smol_tok, smol_tok, names, batch)
    assert out[names[0]].item() == pytest.approx(0.0, abs=1e-6)
    out, grad = _objective_run(tiny_model(smol_tok, seed=0), tiny_model(smol_tok, seed=1),
                               smol_tok, smol_tok, names, batch)
    assert out[names[0]].item() > 0 and torch.isfinite(grad).all()


def test_grad_norm_balance_weights_each_term_by_its_gradient_norm(smol_tok):
    batch = Aligner(smol_tok, smol_tok).batch(TEXTS)
    teacher, student = tiny_model(smol_tok, seed=0), tiny_model(smol_tok, seed=1)
    with torch.inference_mode():
        th = hidden_states(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    sh = hidden_states(student, batch["student_input_ids"], batch["student_attention_mask"])
    specs = [LossSpec("alm"), LossSpec("clm")]
    args = (batch, sh, output_head(student), th, output_head(teacher), 10, 10)
    fixed = DistillObjective(specs, smol_tok, smol_tok)(*args)
    # grad_norm_hidden: 1 / ||d term / d last hidden state||, not normalised
    out = DistillObjective(specs, smol_tok, smol_tok, "grad_norm_hidden")(*args)
    want = 0.0
    for name in ("alm", "clm"):
        part = DistillObjective([LossSpec(name)], smol_tok, smol_tok)(*args)["loss"]
        (g,) = torch.autograd.grad(part, sh, retain_graph=True)
        want += fixed[name].item() / g.norm().item()
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    # grad_norm (the reference's): 1 / ||d term / d last layer's parameters||, weights summing
    # to one: sum_i w_i L_i / sum_i w_i
    last = list(student.model.layers[-1].parameters())
    out = DistillObjective(specs, smol_tok, smol_tok, "grad_norm")(*args, balance_params=last)
    weights = {}
    for name in ("alm", "clm"):
        part = DistillObjective([LossSpec(name)], smol_tok, smol_tok)(*args)["loss"]
        grads = torch.autograd.grad(part, last, retain_graph=True)
        weights[name] = 1 / torch.cat([g.flatten() for g in grads]).norm().item()
    want = sum(weights[n] * fixed[n].item() for n in weights) / sum(weights.values())
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    assert min(fixed[n].item() for n in weights) <= out["loss"].item() <= max(
        fixed[n].item() for n in weights)  # a weighted mean keeps one loss's size
    out["loss"].backward()


def test_what_each_objective_needs_of_the_teacher(smol_tok):
    def need(*names):
        return DistillObjective([LossSpec(n) for n in names], smol_tok, smol_tok).teacher_need

    assert need("clm") == "none"
    assert need("alm") == need("alm", "clm") == "logprobs"  # the teacher cache suffices
    for name in ("alm_hidden", "uld", "uld_chunked", "kd_shared"):
        assert need("alm", "clm", name) == "hidden"  # the live teacher


def test_unknown_names_are_clear_errors(smol_tok):
    with pytest.raises(CtdError, match="valid: alm, clm, alm_hidden, uld"):
        LossSpec("almm")
    with pytest.raises(CtdError, match="binary_ce"):
        LossSpec("alm", distance="l2")
    with pytest.raises(CtdError, match="grad_norm"):
        DistillObjective([LossSpec("clm")], smol_tok, smol_tok, balance="auto")
    with pytest.raises(CtdError, match="no option 'tau'"):
        LossSpec("clm", tau=1.0)  # an option of another loss is refused, not ignored


def test_hidden_states_through_peft(smol_tok):
    import peft

    model = tiny_model(smol_tok)
    ids = torch.tensor([[0, 5, 6, 7]])
    mask = torch.ones_like(ids)
    want = model(input_ids=ids, attention_mask=mask).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    got = output_head(lora)(hidden_states(lora, ids, mask))
    torch.testing.assert_close(got, want)


def test_vocab_map_exact_and_min_edit(smol_tok, gemma_tok):
    """exact: identical bytes only. min_edit: extends exact to every plain teacher token, at the
    global least edit distance for most of them and never farther than its own first piece."""
    tv, sv = byte_vocab(smol_tok), byte_vocab(gemma_tok)
    exact, near = vocab_map(smol_tok, gemma_tok, "exact"), vocab_map(smol_tok, gemma_tok)
    hit = (exact >= 0).nonzero().squeeze(1)
    assert len(hit) > 40_000 and all(tv.pieces[i] == sv.pieces[exact[i]] for i in hit[:2000])
    assert torch.equal(near[hit], exact[hit])
    plain = [i for i, p in enumerate(tv.pieces) if p and not tv.is_special[i]]
    assert (near[plain] >= 0).all()
    missing = [i for i in plain if exact[i] < 0]
    pick = np.random.default_rng(0).choice(missing, 40, replace=False)
    everything = [p.decode("latin-1") for i, p in enumerate(sv.pieces) if p and not sv.is_special[i]]
    best = 0
    for i in pick:
        q = tv.pieces[i].decode("latin-1")
        got = Levenshtein.distance(q, sv.pieces[near[i]].decode("latin-1"))
        first = gemma_tok(q.encode("latin-1").decode("utf-8", "replace"),
                          add_special_tokens=False)["input_ids"][0]
        assert got <= Levenshtein.distance(q, sv.pieces[first].decode("latin-1"))
        best += got == process.extractOne(q, everything, scorer=Levenshtein.distance)[1]
    assert best >= 30  # measured: 84% on Gemma -> SmolLM2, see ctd.losses.kd
    with pytest.raises(CtdError, match="exact, min_edit"):
        vocab_map(smol_tok, gemma_tok, "nearest")


def test_kd_shared_across_tokenizers(gemma_tok, smol_tok):
    # SmolLM2 -> Gemma-3: 3k teacher tokens to place by edit distance (the other way is 210k)
    batch = Aligner(smol_tok, gemma_tok, max_length=64).batch(TEXTS)
    teacher, student = tiny_model(smol_tok, seed=0), tiny_model(gemma_tok, seed=1)
    values = {}
    for mapping in ("exact", "min_edit"):
        out, grad = _objective_run(teacher, student, smol_tok, gemma_tok, ["kd_shared"], batch,
                                   mapping=mapping)
        values[mapping] = out["kd_shared"].item()
        assert values[mapping] > 0 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert values["exact"] != values["min_edit"]


def test_chunk_likelihoods_add_up_to_each_sides_bits_per_byte(gemma_tok, smol_tok):
    """Without merging and the appended space, the chunks' log-likelihoods sum to each side's
    log-likelihood of the text, so they reproduce both models' bits per byte exactly (what
    scripts/diagnose_alm.py checks on the real models)."""
    import math

    from ctd.evaluate import bits_per_byte, target_logprobs
    from ctd.losses.alm import chunk_logliks

    texts = [t["text"] for t in TEXTS[:1]] + ["Ünïcödé 🤗 and 東京, tabs\tand\nlines."]
    batch = Aligner(gemma_tok, smol_tok, max_length=128).batch([{"text": t} for t in texts])
    teacher, student = tiny_model(gemma_tok, "gemma3", seed=0), tiny_model(smol_tok, seed=1)
    with torch.no_grad():
        t_lp = target_logprobs(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        s_lp = target_logprobs(student, batch["student_input_ids"], batch["student_attention_mask"])
    lt, ls, exists = chunk_logliks(t_lp, s_lp, batch["teacher_chunk_ids"],
                                   batch["student_chunk_ids"])
    assert int(exists.sum()) == int(batch["num_chunks"].sum())
    n_bytes = int(batch["num_bytes"].sum())
    for model, tok, chunks in ((teacher, gemma_tok, lt), (student, smol_tok, ls)):
        want = bits_per_byte(model, tok, texts, window=128, progress=False).bpb
        got = -float(chunks[exists].sum()) / math.log(2) / n_bytes
        assert got == pytest.approx(want, rel=1e-5)
