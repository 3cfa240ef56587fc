"""Corpora: deterministic disjoint splits, local files, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctd.corpora import load_corpus, load_texts, take_bytes
from ctd.errors import CtdError


def test_wiki_splits_are_disjoint_deterministic_and_about_90_5_5():
    splits = {s: load_corpus("wiki-en", s) for s in ("train", "validation", "test")}
    titles = {s: set(ds["title"]) for s, ds in splits.items()}
    assert not titles["train"] & titles["validation"]
    assert not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    total = sum(len(t) for t in titles.values())
    assert total == len(load_corpus("wiki-en", "all"))
    assert 0.87 < len(titles["train"]) / total < 0.93
    assert load_corpus("wiki-en", "validation")["title"] == splits["validation"]["title"]


def test_gsm_symbolic_has_masked_prompt_and_worked_solution():
    ds = load_corpus("gsm-symbolic", "validation")
    row = ds[0]
    assert row["text"] == row["prompt"] + row["response"]
    assert row["solution"].rstrip().endswith(f"#### {row['answer']}")
    test_questions = set(load_corpus("gsm-symbolic", "test")["question"])
    assert len(set(ds["question"]) & test_questions) < len(ds) // 10


def test_take_bytes_cuts_exactly_on_a_character_boundary():
    texts = ["aaaa", "é" * 10, "zzz"]
    cut = take_bytes(texts, 9)
    assert cut == ["aaaa", "éé"]  # 4 + 4 bytes; a half "é" is not kept
    assert take_bytes(texts, None) == texts


def test_local_text_file_by_paragraph_and_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert len(load_corpus(str(path), "all", sample_by="paragraph")) == 2
    assert len(load_corpus(str(path), "all", sample_by="line")) == 3


def test_local_jsonl_with_text_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(20)))
    texts = load_texts(str(path), "all", text_field="body")
    assert sorted(texts) == sorted(f"row {i}" for i in range(20))
    with pytest.raises(CtdError, match="--text-field"):
        load_corpus(str(path), "all")


def test_empty_split_and_unknown_corpus_are_clear_errors(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single line")
    empty = next(s for s in ("train", "validation", "test") if s != _split_of("a single line"))
    with pytest.raises(CtdError, match="is empty"):
        load_corpus(str(path), empty)
    with pytest.raises(CtdError, match="unknown corpus"):
        load_corpus("no-such-corpus")


def _split_of(text: str) -> str:
    from ctd.corpora import _hash_split

    return _hash_split(text)


@pytest.mark.skipif(not Path("/usr/share/doc/python3.11/html/_sources").is_dir(),
                    reason="python3.11-doc is not installed (apt-get install python3.11-doc)")
def test_python_docs_is_a_second_domain_split_by_file():
    test = load_corpus("python-docs", "test")
    train_files = set(load_corpus("python-docs", "train")["title"])
    assert len(test) > 100 and not set(test["title"]) & train_files
