"""Step time and peak memory: ALM distillation vs CLM fine-tuning of the same student, and the
teacher forward alone. Prints JSON.

Teacher: SmolLM2-135M on its tokenizer. Student: SmolLM2-135M with its embeddings resized to
Gemma-3's vocabulary (random new rows; a real transplant comes from `ctd transplant`). Each mode
runs in its own process so that peak RSS is its own. The timed step is the trainer's own code
path (Distiller.training_step + backward + AdamW) without Lightning's loop around it.

    python scripts/bench_train.py --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("teacher_forward", "clm_step", "alm_step")


def _batch(batch_size: int, length: int):
    from ctd.collate import AlignedCollator
    from ctd.corpora import load_texts
    from ctd.zoo import load_tokenizer

    t_tok, s_tok = load_tokenizer("smollm2-135m"), load_tokenizer("gemma3-270m")
    joined = "\n\n".join(load_texts("wiki-en", "train", max_bytes=batch_size * 8 * length))
    span = len(joined) // batch_size  # lead sections are short: cut B long documents from them
    docs = [{"text": joined[i * span : (i + 1) * span]} for i in range(batch_size)]
    return t_tok, s_tok, AlignedCollator(t_tok, s_tok, length)(docs)


def run_mode(mode: str, steps: int, batch_size: int, length: int) -> dict:
    import torch

    from ctd.config import OptimConfig
    from ctd.losses.logprobs import hidden_states
    from ctd.losses.objective import DistillObjective, LossSpec
    from ctd.train import Distiller
    from ctd.zoo import load_model

    t_tok, s_tok, batch = _batch(batch_size, length)
    teacher = load_model("smollm2-135m").eval().requires_grad_(False)
    specs = [LossSpec("clm")] if mode == "clm_step" else [LossSpec("alm"), LossSpec("clm")]
    n_chunks, n_tokens = int(batch["num_chunks"].sum()), int(batch["student_loss_mask"].sum())
    batch.update(global_chunks=torch.tensor(n_chunks), global_tokens=torch.tensor(n_tokens))
    if mode == "teacher_forward":
        def step():
            with torch.inference_mode():
                hidden_states(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    else:
        student = load_model("smollm2-135m")
        student.resize_token_embeddings(len(s_tok), mean_resizing=False)
        module = Distiller(student, teacher if mode == "alm_step" else None,
                           DistillObjective(specs, t_tok, s_tok), OptimConfig())
        module._trainer = _FakeTrainer()
        module.log_dict = lambda *args, **kwargs: None  # no logger outside a Trainer
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                                lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)

        def step():
            module.training_step(batch, 0).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "step_s": sum(times[1:]) / steps, "steps": steps,
            "warmup_s": times[0], "peak_rss_mib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024,
            "teacher_tokens": int(batch["teacher_attention_mask"].sum()),
            "student_tokens": int(batch["student_attention_mask"].sum()),
            "chunks": n_chunks}


class _FakeTrainer:
    """What training_step reads from a Trainer: one process, no accumulation."""

    accumulate_grad_batches = 1
    world_size = 1
    strategy = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=MODES)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.mode:
        print(json.dumps(run_mode(a.mode, a.steps, a.batch_size, a.length)))
        return
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(a.steps),
                              "--batch-size", str(a.batch_size), "--length", str(a.length),
                              "--threads", str(a.threads)], capture_output=True, text=True,
                             check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    alm, clm, fwd = results["alm_step"], results["clm_step"], results["teacher_forward"]
    print(json.dumps({
        "threads": a.threads, "batch_size": a.batch_size, "max_length": a.length,
        "results": results,
        "alm_over_fwd_plus_clm": alm["step_s"] / (fwd["step_s"] + clm["step_s"]),
        "alm_over_clm_peak_rss": alm["peak_rss_mib"] / clm["peak_rss_mib"],
        "targets": {"time": 1.10, "memory": 1.2},
    }, indent=2))


if __name__ == "__main__":
    main()
