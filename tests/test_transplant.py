"""ctd transplant: OMP against brute force, every method on tiny models over real tokenizers,
tied/untied, reload, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctd.cli import main
from ctd.errors import CtdError
from ctd.tokens import byte_vocab, doc_start_id
from ctd.transplant import zett
from ctd.transplant.methods import METHODS
from ctd.transplant.omp import omp
from ctd.transplant.run import transplant, transplant_model
from ctd.transplant.vocab import match_vocab, require_shared
from ctd.transplant.wechsel import WechselResources, procrustes
from tests.tiny import tiny_hypernet, tiny_model


def _brute_omp(P: torch.Tensor, y: torch.Tensor, k: int, lam: float = 0.0):
    """Textbook OMP in float64: full correlations, (ridge) least squares re-solved from scratch."""
    P, y, chosen = P.double(), y.double(), []
    r = y
    for _ in range(k):
        c = (P @ r).abs()
        c[chosen] = -1
        chosen.append(int(c.argmax()))
        A = P[chosen].T
        x = torch.linalg.solve(A.T @ A + lam * torch.eye(len(chosen), dtype=A.dtype), A.T @ y)
        r = y - A @ x
    return chosen, x


@pytest.mark.parametrize("ridge", [0.0, 0.05])
@pytest.mark.parametrize("pool", [0, 32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_omp_matches_brute_force_least_squares(pool, seed, ridge):
    g = torch.Generator().manual_seed(seed)
    P, Y, k = torch.randn(400, 32, generator=g), torch.randn(25, 32, generator=g), 10
    res = omp(P, Y, k, pool=pool, batch_size=8, ridge=ridge)
    lam = ridge * float((P * P).sum(1).mean())
    for i in range(len(Y)):
        chosen, x = _brute_omp(P, Y[i], k, lam)
        assert sorted(chosen) == sorted(res.indices[i].tolist())
        ref = dict(zip(chosen, x.tolist()))
        got = dict(zip(res.indices[i].tolist(), res.coefs[i].tolist()))
        assert max(abs(ref[j] - got[j]) for j in chosen) < 1e-5
    approx = torch.einsum("nk,nkd->nd", res.coefs, P[res.indices])
    expect = (Y - approx).norm(dim=1) / Y.norm(dim=1)
    assert torch.allclose(res.residual, expect, atol=1e-5)


def test_ridge_bounds_coefficients_of_near_collinear_atoms():
    """Plain OMP on nearly collinear atoms needs huge coefficients; the transfer would carry
    them to another space. Ridge least squares obeys |x| <= |y| / (2 sqrt(lambda))."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(8, 24, generator=g)
    P = torch.cat([base, base + 0.02 * torch.randn(8, 24, generator=g)])
    Y = torch.randn(16, 24, generator=g)
    plain = omp(P, Y, 16, pool=0)
    assert plain.stopped == 0 and plain.coefs.norm(dim=1).max() > 100
    ridged = omp(P, Y, 16, pool=0, ridge=0.01)
    lam = 0.01 * float((P * P).sum(1).mean())
    assert (ridged.coefs.norm(dim=1) <= Y.norm(dim=1) / (2 * lam**0.5) + 1e-4).all()
    assert (ridged.residual < 1).all()  # still a fit, only a more cautious one


def test_omp_guards_near_dependent_atoms():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 16, generator=g)
    P = torch.cat([base, base * 2, base[:1] + 1e-7])  # duplicates: only 3 independent atoms
    Y = base[:2].sum(0, keepdim=True)  # exactly in the span of 2 atoms
    res = omp(P, Y, 6, pool=4)
    assert torch.isfinite(res.coefs).all() and res.stopped == 1
    assert res.residual.item() < 1e-5


def test_fast_mode_runs_and_exact_is_at_least_as_good():
    """Isotropic random atoms are the fast mode's worst case; its quality on real embeddings is
    measured by scripts/bench_transplant.py."""
    g = torch.Generator().manual_seed(3)
    P, Y = torch.randn(2000, 48, generator=g), torch.randn(64, 48, generator=g)
    exact, fast = omp(P, Y, 16), omp(P, Y, 16, pool=64, refresh=8)
    assert torch.isfinite(fast.coefs).all() and len(set(fast.indices[0].tolist())) == 16
    assert exact.residual.mean() <= fast.residual.mean() < 1


@pytest.fixture(scope="module")
def gemma_untied(gemma_tok):
    return tiny_model(gemma_tok, arch="gemma3", tied=False, seed=1)


@pytest.fixture(scope="module")
def smol_donor(smol_tok):
    return tiny_model(smol_tok, arch="llama", tied=True, seed=2)


@pytest.fixture(scope="module")
def match(gemma_tok, smol_tok):
    return match_vocab(gemma_tok, smol_tok)


def _write_vec(path, words, vectors, header=True):
    lines = [f"{len(words)} {vectors.shape[1]}"] if header else []
    lines += [w + " " + " ".join(f"{x:.6f}" for x in v) for w, v in zip(words, vectors, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def word_vectors(tmp_path_factory):
    """Random vectors for the words of a wiki-en sample (fastText .vec text format)."""
    from ctd.corpora import load_texts

    text = " ".join(load_texts("wiki-en", split="validation", max_bytes=200_000))
    words = list(dict.fromkeys(w.strip(".,;:()\"'") for w in text.split()))
    words = [w for w in words if w][:5000]
    vectors = np.random.default_rng(0).standard_normal((len(words), 16)).astype(np.float32)
    return words, vectors, _write_vec(tmp_path_factory.mktemp("vec") / "en.vec", words, vectors)


def _check_rows(report, before_in, before_out, model, match, smol_tok):
    shared = match.shared_ids
    new_in = model.get_input_embeddings().weight
    assert new_in.shape[0] == len(smol_tok) == model.config.vocab_size
    assert torch.equal(new_in[shared], before_in[match.to_base[shared]])  # bit for bit
    assert torch.isfinite(new_in).all()
    if before_out is not None:
        new_out = model.get_output_embeddings().weight
        assert new_out.data_ptr() != new_in.data_ptr()
        assert torch.equal(new_out[shared], before_out[match.to_base[shared]])
    else:
        assert model.get_output_embeddings().weight.data_ptr() == new_in.data_ptr()
    assert report["vocab"]["shared"] == len(shared)


@pytest.fixture(scope="module")
def hypernet(tmp_path_factory, gemma_untied, gemma_tok):
    return tiny_hypernet(tmp_path_factory.mktemp("zett"), gemma_untied, gemma_tok)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_tiny_untied_model(method, gemma_untied, smol_donor, gemma_tok, smol_tok,
                                           match, word_vectors, hypernet):
    model = copy.deepcopy(gemma_untied)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    report = transplant_model(model, gemma_tok, smol_tok, method, k=2, donor=smol_donor,
                              wechsel=WechselResources(word_vectors[2]), hypernet=hypernet)
    _check_rows(report, before_in, before_out, model, match, smol_tok)
    assert set(report["sides"]) == {"input", "output"}
    if method in ("zero", "mean", "random"):
        assert report["sides"]["input"]["fallback"] == report["vocab"]["approximated"]
    elif method == "wechsel":  # 5,000 words cover only part of the new vocabulary
        assert 100 < report["vocab"]["approximated"] - report["sides"]["input"]["fallback"]
    else:
        assert report["sides"]["input"]["fallback"] < report["vocab"]["approximated"] // 10
    if method == "omp":
        assert 0 < report["sides"]["input"]["relative_residual"]["mean"] < 1
    ids = smol_tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def _roberta_layer(i: int) -> set[str]:
    pre = f"model.encoder.layer.{i}."
    mods = ["attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
            "output.dense", "output.LayerNorm"]
    return {pre + m + p for m in mods for p in (".weight", ".bias")}


def _projector(name: str) -> set[str]:
    return {f"{name}.{m}.{p}" for m in ("dense1", "dense2", "ln") for p in ("weight", "bias")}


def test_zett_checkpoint_layout_is_the_published_one(hypernet):
    """The parameter names of ZeTT's PyTorch hypernetworks (hf_hypernet/modeling_hypernet.py
    of bminixhofer/zett), written out: loading a real checkpoint depends on them."""
    from safetensors import safe_open

    with safe_open(hypernet / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    def linear(name: str) -> set[str]:
        return {name + ".weight", name + ".bias"}

    expected = (
        {f"model.embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")}
        | linear("model.embeddings.LayerNorm") | _roberta_layer(0)
        | {"fallback_embeddings.weight"}
        | linear("input_projection.0") | _projector("input_projection.1")
        | _projector("output_projection.0") | linear("output_projection.1")
        | _projector("output_projection_out.0") | linear("output_projection_out.1")
        | {f"{s}.{p}" for s in ("in_scaler", "scaler", "out_scaler") for p in "wb"}
        | linear("bias_projection")
    )
    assert keys == expected


def test_zett_rows_are_the_hypernetwork_on_the_base_pieces(gemma_untied, gemma_tok, smol_tok,
                                                            match, hypernet):
    """New rows = the hypernetwork applied to the base rows (input | lm_head) of the token's
    pieces under the base tokenizer; padding does not change a prediction."""
    model = copy.deepcopy(gemma_untied)
    e_in = model.get_input_embeddings().weight.detach().clone()
    e_out = model.get_output_embeddings().weight.detach().clone()
    report = transplant_model(model, gemma_tok, smol_tok, "zett", hypernet=hypernet)
    assert report["params"] == {"hypernet": str(hypernet)}
    net = zett.load(hypernet, 64, tied=False, base_rows=len(e_in))
    source = torch.cat([e_in, e_out], dim=1)
    pieces_of = byte_vocab(smol_tok).pieces
    words = [(i, pieces_of[i].decode()) for i in match.new_ids
             if pieces_of[i].strip().isascii() and pieces_of[i].strip().isalpha()][:20]
    assert len(words) == 20
    for i, text in words:
        pieces = gemma_tok(text, add_special_tokens=False)["input_ids"]
        for width in (net.maxlen, net.maxlen + 5):
            surface = torch.full((1, width), net.pad_id)
            surface[0, : len(pieces)] = torch.tensor(pieces[: net.maxlen])
            p_in, p_out = zett.predict(net, surface, source)
            assert torch.allclose(model.get_input_embeddings().weight[i], p_in[0], atol=1e-5)
            assert torch.allclose(model.get_output_embeddings().weight[i], p_out[0], atol=1e-5)
    with pytest.raises(CtdError, match="beyond the 262,145 ids the hypernetwork knows"):
        zett.predict(net, torch.tensor([[5, len(e_in) + 1]]), source)


@pytest.mark.parametrize("method", ["omp", "zett"])
def test_tied_stays_tied(method, gemma_tok, smol_tok, smol_donor, match, tmp_path):
    model = tiny_model(gemma_tok, arch="qwen2", tied=True, seed=3)
    before = model.get_input_embeddings().weight.detach().clone()
    report = transplant_model(model, gemma_tok, smol_tok, method, k=2, donor=smol_donor, fast=True,
                              hypernet=tiny_hypernet(tmp_path, model, gemma_tok))
    _check_rows(report, before, None, model, match, smol_tok)
    assert report["tied"] and set(report["sides"]) == {"input"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, gemma_tok, smol_tok, gemma_untied, smol_donor):
    root = tmp_path_factory.mktemp("transplant")
    for name, model, tok in [("base", gemma_untied, gemma_tok), ("donor", smol_donor, smol_tok)]:
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    smol_tok.save_pretrained(root / "tok-only")
    return root


def test_written_output_reloads(dirs, smol_tok, gemma_untied):
    out = dirs / "out"
    report = transplant(str(dirs / "base"), str(dirs / "donor"), out, "fvt", show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == smol_tok.get_vocab()
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (
        tok.bos_token_id, tok.eos_token_id)
    assert not model.config.tie_word_embeddings
    saved = json.loads((out / "transplant_report.json").read_text())
    assert saved["method"] == "fvt" and saved["timings"]["total_s"] > 0
    assert saved["versions"]["torch"] == torch.__version__
    shared = np.asarray(report["vocab"]["shared"])
    assert shared > 40_000
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert not list(dirs.glob(".out.tmp-*"))


def _cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


def test_bad_inputs_one_line_exit_2_nothing_written(dirs, capsys, tmp_path, gemma_tok,
                                                      gemma_untied):
    base, donor = str(dirs / "base"), str(dirs / "donor")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep").write_text("x")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    nets = tmp_path.parent / f"{tmp_path.name}-nets"
    tied = tiny_hypernet(nets / "tied", tiny_model(gemma_tok), gemma_tok)
    multilingual = tiny_hypernet(nets / "multi", gemma_untied, gemma_tok, hn_embed_lang_id=True)
    bigger = tiny_hypernet(nets / "big", gemma_untied, gemma_tok, original_vocab_size=10**6)
    partial = tiny_hypernet(nets / "partial", gemma_untied, gemma_tok, original_vocab_size=None)
    bin_only = tiny_hypernet(nets / "bin", gemma_untied, gemma_tok)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    cases = [
        (["--out", str(existing)], "already exists"),
        (["--out", str(blocker / "sub")], "cannot write"),
        (["--out", str(tmp_path / "a"), "--tokenizer", str(dirs / "tok-only")], "--method fvt"),
        (["--out", str(tmp_path / "b"), "--donor", base], "different vocabulary"),
        (["--out", str(tmp_path / "c"), "--k", "1000000"], "exceeds the"),
        (["--out", str(tmp_path / "d"), "--method", "zett"], "--hypernet DIR"),
        (["--out", str(tmp_path / "h"), "--method", "zett", "--hypernet", str(bin_only)],
         "safetensors only"),
        (["--out", str(tmp_path / "i"), "--method", "zett", "--hypernet", str(multilingual)],
         "language ids"),
        (["--out", str(tmp_path / "j"), "--method", "zett", "--hypernet", str(tied)],
         "trained for a model of hidden size 64 with tied embeddings; the base has hidden size "
         "64 with untied"),
        (["--out", str(tmp_path / "k"), "--method", "zett", "--hypernet", str(bigger)],
         "trained for a vocabulary of 1,000,000 tokens; the base has 262,144 rows"),
        (["--out", str(tmp_path / "l"), "--method", "zett", "--hypernet", str(partial)],
         "config.json lacks original_vocab_size"),
        (["--out", str(tmp_path / "e"), "--method", "wechsel"], "--vectors FILE.vec"),
        (["--out", str(tmp_path / "f"), "--method", "wechsel", "--vectors", str(blocker),
          "--target_vectors", str(blocker)], "both --target_vectors and --dictionary"),
        (["--out", str(tmp_path / "g"), "--method", "wechsel", "--vectors", str(blocker)],
         "fastText .vec text format"),
    ]
    for extra, needle in cases:
        args = ["transplant", "--base", base, "--tokenizer", donor, *extra]
        code, err = _cli(capsys, *args)
        lines = [line for line in err.splitlines() if line.startswith("ctd: error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "file"]
    assert [p.name for p in existing.iterdir()] == ["keep"]


def test_unsupported_tokenizer_and_no_shared_tokens(tmp_path, capsys, smol_tok):
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    wp.normalizer = normalizers.Lowercase()
    PreTrainedTokenizerFast(tokenizer_object=wp).save_pretrained(tmp_path / "wp")
    code, err = _cli(capsys, "vocab", "--base", str(tmp_path / "wp"), "--tokenizer", "smollm2-135m")
    assert code == 2 and "WordPiece" in err
    match = match_vocab(smol_tok, smol_tok)
    match.to_base[:] = -1
    with pytest.raises(CtdError, match="share no tokens"):
        require_shared(match)


def test_vocab_verb_reports(capsys, tmp_path):
    main(["vocab", "--base", "gemma3-270m", "--tokenizer", "smollm2-135m", "--json",
          str(tmp_path / "v.json")])
    summary = json.loads((tmp_path / "v.json").read_text())
    assert summary["shared"] > 46_000 and summary["approximated"] > 3_000
    assert summary["digits"]["base"]["style"] == "single digits"
    assert "shared" in capsys.readouterr().out


@pytest.mark.real
def test_real_pair_fast_omp(gemma_tok, smol_tok, match):
    from ctd.zoo import load_model

    base, donor = load_model("gemma3-270m"), load_model("smollm2-135m")
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."

    def bits_per_byte(model, tok) -> float:
        ids = torch.tensor([[doc_start_id(tok), *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        return loss * (ids.shape[1] - 1) / len(text.encode()) / np.log(2)

    bpb_before = bits_per_byte(base, gemma_tok)
    before = base.get_input_embeddings().weight.detach().clone()
    report = transplant_model(base, gemma_tok, smol_tok, "omp", k=16, donor=donor, fast=True)
    _check_rows(report, before, None, base, match, smol_tok)
    assert report["sides"]["input"]["relative_residual"]["mean"] < 0.6
    assert bits_per_byte(base, smol_tok) < 1.5 * bpb_before


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((50, 8))
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    np.testing.assert_allclose(src @ q @ procrustes(src, src @ q), src, atol=1e-10)


def test_wechsel_rows_and_cross_lingual_alignment(tmp_path, gemma_tok, smol_tok, match,
                                                  word_vectors):
    """Each covered row is softmax(cos / 0.1) over its 10 nearest base tokens; target-language
    vectors that are a rotation of the source ones, with an identity dictionary, give the same
    rows as the one-language run."""
    from ctd.transplant.methods import Inputs, method_wechsel
    from ctd.transplant.wechsel import aligned_vectors, token_vectors

    words, vectors, path = word_vectors
    one = WechselResources(path)
    ids, vb = match.new_ids, len(gemma_tok)
    got = method_wechsel(Inputs(match, gemma_tok, smol_tok, None, 10, wechsel=one), ids, vb)
    w = got.weights.to_dense()
    covered = (~got.fallback).nonzero().squeeze(1)
    assert len(covered) > 100
    torch.testing.assert_close(w[covered].sum(1), torch.ones(len(covered)))
    assert (w >= 0).all() and ((w[covered] > 0).sum(1) <= 10).all()
    # the heaviest base token is the most cosine-similar one in word space
    _, src, _, _ = aligned_vectors(one)
    base_vec, base_has = token_vectors(gemma_tok, words, src, vb)
    new_vec, _ = token_vectors(smol_tok, words, src, int(ids.max()) + 1)
    special = torch.from_numpy(byte_vocab_special(gemma_tok, vb))
    for row in covered[:20].tolist():
        cos = torch.nn.functional.cosine_similarity(new_vec[ids[row]][None], base_vec, dim=1)
        cos[~base_has | special] = -2
        assert cos[w[row].argmax()] == pytest.approx(float(cos.max()), abs=1e-3)

    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((16, 16)))
    target = _write_vec(tmp_path / "xx.vec", words, (vectors @ q).astype(np.float32), header=False)
    (tmp_path / "dict.txt").write_text("\n".join(f"{x} {x}" for x in words))
    two = WechselResources(path, target, tmp_path / "dict.txt")
    crossed = method_wechsel(Inputs(match, gemma_tok, smol_tok, None, 10, wechsel=two), ids, vb)
    assert torch.equal(crossed.fallback, got.fallback)
    torch.testing.assert_close(crossed.weights.to_dense(), w, atol=1e-4, rtol=1e-3)


def byte_vocab_special(tok, size: int) -> np.ndarray:
    from ctd.tokens import byte_vocab

    out = np.zeros(size, dtype=bool)
    special = byte_vocab(tok).is_special[:size]
    out[: len(special)] = special
    return out


def test_transplant_rows_stay_in_scale_when_donor_atoms_are_nearly_collinear(gemma_tok, smol_tok,
                                                                             match):
    """The pair-B failure in miniature: a donor whose embedding is nearly low-rank (its atoms
    nearly collinear) and a base whose rows are not. Without ridge the largest new row here is
    2.5x the largest shared row; with it, 0.2x."""
    donor = tiny_model(smol_tok, arch="llama", tied=True, seed=5)
    g = torch.Generator().manual_seed(5)
    V, D = donor.get_input_embeddings().weight.shape
    low_rank = torch.randn(V, 8, generator=g) @ torch.randn(8, D, generator=g) / 8**0.5
    with torch.no_grad():
        donor.get_input_embeddings().weight.copy_(low_rank + 0.005 * torch.randn(V, D, generator=g))
    model = tiny_model(gemma_tok, arch="gemma3", tied=True, seed=6)
    shared_norm = model.get_input_embeddings().weight.norm(dim=1).max()
    report = transplant_model(model, gemma_tok, smol_tok, "omp", k=32, donor=donor)
    assert report["sides"]["input"]["ridge"] > 0
    new_rows = model.get_input_embeddings().weight[torch.as_tensor(match.new_ids)]
    assert new_rows.norm(dim=1).max() < shared_norm
