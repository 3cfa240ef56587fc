"""Step time and peak memory: ALM distillation (live teacher, and from the teacher cache) vs CLM
fine-tuning of the same student, and the teacher forward alone. Prints JSON.

Teacher: SmolLM2-135M on its tokenizer. Student: SmolLM2-135M with its embeddings resized to
Gemma-3's vocabulary (random new rows; a real transplant comes from `ctd transplant`). Each mode
runs in its own process so that peak RSS is its own; the cached mode never loads the teacher
(its batch carries the cache's two columns). The timed step is the trainer's own code path
(Distiller.training_step + backward + AdamW) without Lightning's loop around it, under the
precision `ctd distill` would choose (`--precision auto`: bf16 autocast where this CPU has a
bf16 fast path). Also reports the teacher cache's size per million teacher tokens.

    python scripts/bench_train.py --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

MODES = ("teacher_forward", "clm_step", "alm_step", "alm_cached_step")


def _batch(batch_size: int, length: int):
    from ctd.collate import Aligner
    from ctd.corpora import load_texts
    from ctd.zoo import load_tokenizer

    t_tok, s_tok = load_tokenizer("smollm2-135m"), load_tokenizer("gemma3-270m")
    joined = "\n\n".join(load_texts("wiki-en", "train", max_bytes=batch_size * 8 * length))
    span = len(joined) // batch_size  # lead sections are short: cut B long documents from them
    docs = [{"text": joined[i * span : (i + 1) * span]} for i in range(batch_size)]
    return t_tok, s_tok, Aligner(t_tok, s_tok, length, windows=False).batch(docs)


def run_mode(mode: str, steps: int, batch_size: int, length: int, precision: str,
             balance: str) -> dict:
    import pytorch_lightning as pl
    import torch

    from ctd.config import OptimConfig
    from ctd.losses.logprobs import hidden_states
    from ctd.losses.objective import DistillObjective, LossSpec
    from ctd.train import Distiller
    from ctd.train import precision as resolve_precision
    from ctd.zoo import load_model

    t_tok, s_tok, batch = _batch(batch_size, length)
    n_chunks, n_tokens = int(batch["num_chunks"].sum()), int(batch["student_loss_mask"].sum())
    batch.update(global_chunks=torch.tensor(n_chunks), global_tokens=torch.tensor(n_tokens))
    specs = [LossSpec("clm")] if mode == "clm_step" else [LossSpec("alm"), LossSpec("clm")]
    teacher = None
    if mode in ("teacher_forward", "alm_step"):
        teacher = load_model("smollm2-135m").eval().requires_grad_(False)
    if mode == "alm_cached_step":  # what the cache's two columns look like to the step
        g = torch.Generator().manual_seed(0)
        shape = batch["teacher_input_ids"].shape
        batch["teacher_logprobs"] = -torch.rand(shape, generator=g) * 4
        batch["teacher_boundary"] = -torch.rand(shape, generator=g) * 2
    used = resolve_precision(precision, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if used == "bf16-mixed" \
        else contextlib.nullcontext()
    if mode == "teacher_forward":
        def step():
            with torch.inference_mode(), autocast:
                hidden_states(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    else:
        student = load_model("smollm2-135m")
        student.resize_token_embeddings(len(s_tok), mean_resizing=False)
        module = Distiller(student, teacher, DistillObjective(specs, t_tok, s_tok, balance),
                           OptimConfig())
        module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                    enable_checkpointing=False, enable_model_summary=False)
        module.log_dict = lambda *args, **kwargs: None  # no fit loop to log into
        opt = module.configure_optimizers()["optimizer"]  # the trainer's own (fused AdamW)

        def step():
            with autocast:
                loss = module.training_step(batch, 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "precision": used, "balance": balance,
            "step_s": sum(times[1:]) / steps, "steps": steps, "warmup_s": times[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "teacher_tokens": int(batch["teacher_attention_mask"].sum()),
            "student_tokens": int(batch["student_attention_mask"].sum()), "chunks": n_chunks}


def cache_bytes_per_million_tokens() -> float:
    """On-disk size of the teacher cache's two float32 columns (plus list offsets) per million
    teacher tokens, measured on a saved dataset."""
    import tempfile
    from pathlib import Path

    import datasets
    import numpy as np

    rows = [np.zeros(257, np.float32)] * 4000  # ~1M teacher positions in 256-token windows
    feature = datasets.Sequence(datasets.Value("float32"))
    ds = datasets.Dataset.from_dict({"teacher_logprobs": rows, "teacher_boundary": rows},
                                    features=datasets.Features({"teacher_logprobs": feature,
                                                                "teacher_boundary": feature}))
    with tempfile.TemporaryDirectory() as tmp:
        ds.save_to_disk(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.arrow"))
    return size / (257 * len(rows)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", help="auto, 32-true or bf16-mixed")
    ap.add_argument("--balance", default="fixed", help="fixed, grad_norm or grad_norm_hidden")
    ap.add_argument("--mode", choices=MODES)
    a = ap.parse_args()
    import torch

    from ctd.numerics import machine

    torch.set_num_threads(a.threads)
    if a.mode:
        print(json.dumps(run_mode(a.mode, a.steps, a.batch_size, a.length, a.precision,
                                  a.balance)))
        return
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(a.steps),
                              "--batch-size", str(a.batch_size), "--length", str(a.length),
                              "--threads", str(a.threads), "--precision", a.precision,
                              "--balance", a.balance], capture_output=True, text=True,
                             check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    alm, clm, fwd = results["alm_step"], results["clm_step"], results["teacher_forward"]
    cached = results["alm_cached_step"]
    print(json.dumps({
        "command": " ".join(sys.argv), "machine": machine(), "batch_size": a.batch_size,
        "max_length": a.length, "results": results,
        "alm_over_fwd_plus_clm": alm["step_s"] / (fwd["step_s"] + clm["step_s"]),
        "alm_over_clm_peak_rss": alm["peak_rss_mib"] / clm["peak_rss_mib"],
        "alm_cached_over_clm": cached["step_s"] / clm["step_s"],
        "alm_cached_over_clm_peak_rss": cached["peak_rss_mib"] / clm["peak_rss_mib"],
        "teacher_cache_mb_per_million_tokens": cache_bytes_per_million_tokens() / 2**20,
        "targets": {"time": 1.10, "memory": 1.2, "cached_time": 1.05, "cached_memory": 1.05},
    }, indent=2))


if __name__ == "__main__":
    main()
