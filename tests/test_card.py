"""Model cards: the hub's front matter, inherited licenses, and the command that made the model."""

from __future__ import annotations

import json

import pytest

from ctd.card import read_front_matter, write_card
from ctd.errors import CtdError
from ctd.transplant.run import transplant


def test_card_front_matter_and_sections(tmp_path):
    bpb = {"wiki-en test": {"bpb": 0.91234, "command": "ctd eval --model DIR --split test"}}
    details = {"method": "alm", "train": {"max_steps": 40, "lr": 1e-5}, "data": ["wiki-en"]}
    path = write_card(tmp_path, kind="distill", base="smollm2-135m", tokenizer="smollm2-135m",
                      command="ctd distill --config c.yaml", details=details, bpb=bpb)
    meta = read_front_matter(tmp_path)
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "library_name": "transformers", "license": "apache-2.0",
                    "pipeline_tag": "text-generation",
                    "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct", "tags": ["ctd", "distill"]}
    text = path.read_text()
    assert "- train.max_steps: 40" in text and "- train.lr: 1e-05" in text
    assert "| wiki-en test | 0.9123 | `ctd eval --model DIR --split test` |" in text
    assert text.rstrip().endswith("ctd distill --config c.yaml")


@pytest.mark.parametrize("base,license_", [("gemma3-270m", "gemma"),
                                           ("qwen2.5-coder-0.5b", "apache-2.0")])
def test_license_and_base_come_from_the_base(base, license_, tmp_path):
    write_card(tmp_path / "a", kind="transplant", base=base, tokenizer="smollm2-135m",
               command="ctd transplant ...", details={})
    assert read_front_matter(tmp_path / "a")["license"] == license_
    # a model made from that directory inherits through its card
    write_card(tmp_path / "b", kind="distill", base=str(tmp_path / "a"), tokenizer="x",
               command="c", details={})
    assert read_front_matter(tmp_path / "b")["license"] == license_
    # ... and names the tokenizer the transplant was moved onto, not its base's
    write_card(tmp_path / "d", kind="heal", base=str(tmp_path / "a"),
               tokenizer=str(tmp_path / "a"), command="c", details={})
    assert read_front_matter(tmp_path / "d")["tokenizer"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "tokenizer of HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "d/README.md").read_text()
    # an unknown local base: no license or base_model is claimed
    (tmp_path / "bare").mkdir()
    write_card(tmp_path / "c", kind="distill", base=str(tmp_path / "bare"), tokenizer="x",
               command="c", details={})
    assert {"license", "base_model"}.isdisjoint(read_front_matter(tmp_path / "c"))


def test_bad_card_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(CtdError, match="unknown model kind"):
        write_card(tmp_path, kind="merge", base="b", tokenizer="t", command="c", details={})
    with pytest.raises(CtdError, match="bpb must map"):
        write_card(tmp_path, kind="distill", base="b", tokenizer="t", command="c", details={},
                   bpb={"wiki": 0.9})


def test_transplant_writes_its_card(tmp_path, gemma_untied, smol_donor, gemma_tok, smol_tok):
    for name, model, tok in [("base", gemma_untied, gemma_tok), ("donor", smol_donor, smol_tok)]:
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "out"
    transplant(str(tmp_path / "base"), str(tmp_path / "donor"), out, "omp", k=8, fast=True,
               show_progress=False)
    assert json.loads((out / "transplant_report.json").read_text())["method"] == "omp"
    meta = read_front_matter(out)
    assert meta["tags"] == ["ctd", "transplant", "tokenizer-transplant", "omp"]
    assert "license" not in meta  # a local base without a card
    text = (out / "README.md").read_text()
    assert f"ctd transplant --base {tmp_path / 'base'} --tokenizer {tmp_path / 'donor'} " \
           f"--method omp --fast --k 8 --out {out}" in text
    assert "<|endoftext|> -> base <bos> (start)" in text
    assert "mean relative residual.input:" in text and "ctd eval --model DIR" in text
