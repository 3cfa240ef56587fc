"""The precision chosen for speed follows the hardware: measured once, cached, overridable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ctd import numerics
from ctd.errors import CtdError

_ASK = "from ctd.numerics import fast_dtype; print(fast_dtype())"


def _ask(tmp_path, **env) -> str:
    env = {**{k: v for k, v in os.environ.items() if k != "CTD_FAST_DTYPE"},
           "CTD_CACHE": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", _ASK], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_choice_follows_the_measurement_and_is_cached(tmp_path):
    assert _ask(tmp_path) in ("torch.bfloat16", "torch.float32")
    saved = json.loads((tmp_path / "numerics.json").read_text())
    (key, times), = saved.items()
    assert numerics.cpu_model() in key and torch.__version__ in key
    want = "torch.bfloat16" if times["bfloat16_s"] * numerics._SPEEDUP < times["float32_s"] \
        else "torch.float32"
    assert _ask(tmp_path) == want
    # later runs read the cache: doctored times decide without a new measurement
    for bf16, fp32, chosen in ((0.001, 1.0, "torch.bfloat16"), (1.0, 0.001, "torch.float32")):
        (tmp_path / "numerics.json").write_text(json.dumps(
            {key: {"bfloat16_s": bf16, "float32_s": fp32}}))
        assert _ask(tmp_path) == chosen


def test_a_cpu_without_a_bf16_path_gets_float32(tmp_path):
    """Limiting oneDNN, ATen and MKL to AVX2 (as on an AMD EPYC host) makes bf16 an emulation;
    the limited machine is measured and cached apart from the same CPU unlimited."""
    _ask(tmp_path)
    avx2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert _ask(tmp_path, **avx2) == "torch.float32"
    keys = json.loads((tmp_path / "numerics.json").read_text())
    assert len(keys) == 2 and any("MKL_ENABLE_INSTRUCTIONS" in k for k in keys)


def test_override_and_bad_override(tmp_path, monkeypatch):
    assert _ask(tmp_path, CTD_FAST_DTYPE="bfloat16") == "torch.bfloat16"
    assert not (tmp_path / "numerics.json").exists()  # nothing measured when told
    monkeypatch.setenv("CTD_FAST_DTYPE", "float16")
    numerics.fast_dtype.cache_clear()
    with pytest.raises(CtdError, match="bfloat16 or float32"):
        numerics.fast_dtype()
    numerics.fast_dtype.cache_clear()
    assert numerics.resolve_dtype("float32") is torch.float32
    with pytest.raises(CtdError, match="auto, bfloat16 or float32"):
        numerics.resolve_dtype("half")
