"""ctd transplant: every method on tiny models over real tokenizers, tied/untied, reload, bad
input, and a real pair. OMP, ZeTT and WECHSEL have their own test files."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctd.cli import main
from ctd.errors import CtdError
from ctd.tokens import doc_start_id
from ctd.transplant.methods import METHODS
from ctd.transplant.run import transplant, transplant_model
from ctd.transplant.vocab import match_vocab, require_shared
from tests.tiny import tiny_hypernet, tiny_model


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


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_tiny_untied_model(method, gemma_untied, smol_donor, gemma_tok, smol_tok,
                                           match, word_vectors, hypernet):
    model = copy.deepcopy(gemma_untied)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    spec = METHODS[method]
    files = {"vectors": word_vectors[2], "hypernet": hypernet}
    report = transplant_model(model, gemma_tok, smol_tok, method, k=2 if spec.k else None,
                              donor=smol_donor if spec.donor else None,
                              resources={r.name: files[r.name] for r in spec.resources
                                         if r.required})
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


@pytest.mark.parametrize("method", ["omp", "zett"])
def test_tied_stays_tied(method, gemma_tok, smol_tok, smol_donor, match, tmp_path):
    model = tiny_model(gemma_tok, arch="qwen2", tied=True, seed=3)
    before = model.get_input_embeddings().weight.detach().clone()
    if method == "omp":
        report = transplant_model(model, gemma_tok, smol_tok, method, k=2, donor=smol_donor,
                                  fast=True)
    else:
        report = transplant_model(model, gemma_tok, smol_tok, method, resources={
            "hypernet": tiny_hypernet(tmp_path, model, gemma_tok)})
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
        (["--out", str(tmp_path / "m"), "--vectors", str(blocker)], "not used by method 'omp'"),
        (["--out", str(tmp_path / "n"), "--method", "fvt", "--k", "3"], "takes no --k"),
        (["--out", str(tmp_path / "o"), "--method", "knn", "--fast"], "no fast mode"),
        (["--out", str(tmp_path / "p"), "--method", "nope"], "expected one of omp, fvt"),
        (["--out", str(tmp_path / "q"), "--tokenizer", str(tmp_path / "missing")],
         "unknown tokenizer"),
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


def test_cli_says_only_what_ctd_says(zoo_dir, tmp_path):
    """A transplant from the console script prints no library's warnings or INFO lines (e.g.
    DeepSpeed's "no GPU found", imported by accelerate whenever a model is saved)."""
    ctd = Path(sys.executable).with_name("ctd")
    out = subprocess.run([str(ctd), "transplant", "--base", str(zoo_dir / "teacher"),
                          "--tokenizer", str(zoo_dir / "student"), "--method", "fvt",
                          "--out", str(tmp_path / "moved")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    noise = [line for line in (out.stdout + out.stderr).splitlines()
             if "WARNING" in line or "INFO" in line or "Warning" in line]
    assert noise == []
