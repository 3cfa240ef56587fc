"""Which precision is fast on the hardware in hand.

Reduced precision is only worth it where the hardware has a fast path for it: bf16 GEMM is ~5x
faster than fp32 on a CPU with AMX (Sapphire Rapids and later) but 4-40x SLOWER on one with
AVX2 only, where oneDNN emulates it. So nothing in ctd assumes a dtype's speed: screening
GEMMs, training autocast and the teacher's dtype ask `fast_dtype()`, which answers from a
micro-benchmark run once per machine (~0.1-0.5 s) and cached under `$CTD_CACHE/numerics.json`,
keyed by CPU model, torch version and the ISA limits in the environment. `CTD_FAST_DTYPE`
(`bfloat16` or `float32`) overrides it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from functools import cache

import torch

from ctd.errors import CtdError

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_SPEEDUP = 1.3  # bf16 must beat fp32 by this factor to be chosen (it costs precision)
# A screening-shaped GEMM ([n, D] @ [D, S]): small enough to time in well under a second even
# where bf16 is emulated, large enough that kernels, not overheads, are timed.
_SHAPE = (128, 256, 4096)
# Environment variables that limit the instruction sets torch's kernels use (oneDNN, ATen's
# own kernels, MKL): set to AVX2, they make an AVX-512 machine compute like an AVX2-only one.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
              "MKL_ENABLE_INSTRUCTIONS")


@cache
def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name", else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """What every benchmark records about the machine it ran on."""
    return {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "fast_dtype_cpu": str(fast_dtype("cpu")).removeprefix("torch."),
            "isa_limits": isa_limits()}


def isa_limits() -> dict[str, str]:
    """The `ISA_LIMITS` set in this environment."""
    return {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}


def _time_gemm(dtype: torch.dtype, reps: int = 3) -> float:
    n, d, s = _SHAPE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g).to(dtype)
    b = torch.randn(d, s, generator=g).to(dtype)
    a @ b  # warm-up: kernel selection, allocation
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return (time.perf_counter() - start) / reps


def _cache_key() -> str:
    return json.dumps([cpu_model(), torch.__version__, torch.backends.cpu.get_cpu_capability(),
                       isa_limits()])


def _measured_cpu() -> dict[str, float]:
    """fp32 and bf16 GEMM seconds on this CPU, measured once and cached on disk."""
    from ctd.io import cache_dir, write_json

    path = cache_dir() / "numerics.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    key = _cache_key()
    if key not in saved:
        saved[key] = {"float32_s": _time_gemm(torch.float32),
                      "bfloat16_s": _time_gemm(torch.bfloat16)}
        try:
            write_json(path, saved)
        except OSError:  # a read-only cache costs a re-measurement next time, nothing more
            pass
    return saved[key]


@cache
def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where `device` computes it clearly faster than float32, else float32."""
    forced = os.environ.get("CTD_FAST_DTYPE")
    if forced:
        if forced not in _DTYPES:
            raise CtdError(f"CTD_FAST_DTYPE={forced!r}; use bfloat16 or float32")
        return _DTYPES[forced]
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind != "cpu":
        return torch.float32
    t = _measured_cpu()
    return torch.bfloat16 if t["bfloat16_s"] * _SPEEDUP < t["float32_s"] else torch.float32


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name; "auto" is `fast_dtype(device)`."""
    if name == "auto":
        return fast_dtype(device)
    if name not in _DTYPES:
        raise CtdError(f"unknown dtype {name!r}; use auto, bfloat16 or float32")
    return _DTYPES[name]
