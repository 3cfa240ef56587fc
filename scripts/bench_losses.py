"""Benchmark the aligner and the losses; prints JSON.

    .venv/bin/python scripts/bench_losses.py [--hidden 128] [--align-mb 4]

Aligner (Gemma-3 teacher, SmolLM2 student, max_length 512, wiki-en, this one process, tokenizers
single-threaded as in a DataLoader worker), in MB/s of text, stage by stage:
- tokenize: HF tokenization of one side alone (the floor of everything below);
- align: `ctd.align.align` of two given tokenizations (the aligner proper);
- rows: tokenize both sides + byte check + align + windows (`Aligner.rows`) in this process;
- cached_pass: the one-time cached `datasets.map` of `ctd.data` (`aligned_rows`) that
  `ctd distill` runs before training (one process, the Rust tokenizers on every core), in a
  fresh process;
- worker: what a DataLoader worker does per batch once rows are cached (read + `pad`).
Losses: forward+backward at B=4, T=512, V=262,144 from random hidden states through random
linear heads (the loss cost alone, no transformer), each in a fresh subprocess so that its peak
RSS is its own. Baseline: the teacher's forward logits plus plain cross-entropy of the student
with full [B, T, V] logits, which is what "two forward passes and CLM" cost in the head.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from unittest import mock

if "--pass-mb" not in sys.argv:  # single-threaded tokenizers, as in a DataLoader worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")

B, T, V = 4, 512, 262_144
CASES = ["ce_plain", "teacher_forward", "clm", "alm", "alm+clm", "alm_hidden", "uld",
         "uld_chunked", "kd_shared"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_aligner(megabytes: float) -> dict:
    import tempfile

    import datasets

    from ctd.align import align
    from ctd.collate import Aligner
    from ctd.corpora import load_texts
    from ctd.data import RowReader, StepCollator, aligned_rows
    from ctd.tokens import encode
    from ctd.zoo import load_tokenizer

    texts = load_texts("wiki-en", split="train", max_bytes=int(megabytes * 2**20))
    mb = sum(len(t.encode()) for t in texts) / 2**20
    teacher, student = load_tokenizer("gemma3-270m"), load_tokenizer("smollm2-135m")
    aligner = Aligner(teacher, student, 512)
    aligner.rows([{"text": t} for t in texts[:8]])  # warm the byte vocabularies

    def rate(fn) -> float:
        start = time.perf_counter()
        fn()
        return round(mb / (time.perf_counter() - start), 2)

    out = {"texts": len(texts), "text_mb": round(mb, 3), "mb_per_s": {}}
    speed = out["mb_per_s"]
    encoded = {}
    for side, tok in (("teacher", teacher), ("student", student)):
        speed[f"tokenize_{side}"] = rate(lambda t=tok, s=side: encoded.__setitem__(s, encode(t, texts)))
    speed["align"] = rate(lambda: [align(a, b) for a, b in zip(encoded["teacher"], encoded["student"])])
    speed["rows"] = rate(lambda: [aligner.rows([{"text": t} for t in texts[i : i + 64]])
                                  for i in range(0, len(texts), 64)])
    ds = datasets.Dataset.from_dict({"text": texts})
    # tokenizer threads are fixed when a process first tokenizes: the pass gets a process of its own
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    proc = subprocess.run([sys.executable, __file__, "--pass-mb", str(megabytes)], env=env,
                          capture_output=True, text=True, check=True)
    speed["cached_pass"] = json.loads(proc.stdout.strip().splitlines()[-1])
    # rows for the worker, in a cache of their own rather than the user's
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, CTD_CACHE=cache):
        rows = aligned_rows(ds, aligner)
        reader, pad = RowReader(rows), StepCollator(aligner.teacher_start, aligner.student_start)
        speed["worker"] = rate(lambda: [pad(reader.__getitems__(list(range(i, min(i + 16, len(reader))))))
                                        for i in range(0, len(reader), 16)])
    return out


def default_pass(megabytes: float) -> float:
    """MB/s of the cached tokenize-and-align pass as `ctd distill` runs it."""
    import tempfile

    import datasets

    from ctd.collate import Aligner
    from ctd.corpora import load_texts
    from ctd.data import aligned_rows
    from ctd.zoo import load_tokenizer

    datasets.disable_progress_bars()
    texts = load_texts("wiki-en", split="train", max_bytes=int(megabytes * 2**20))
    mb = sum(len(t.encode()) for t in texts) / 2**20
    aligner = Aligner(load_tokenizer("gemma3-270m"), load_tokenizer("smollm2-135m"), 512)
    aligner.rows([{"text": t} for t in texts[:8]])
    ds = datasets.Dataset.from_dict({"text": texts})
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CTD_CACHE"] = cache
        start = time.perf_counter()
        aligned_rows(ds, aligner)
        return round(mb / (time.perf_counter() - start), 2)


def run_case(case: str, hidden: int) -> dict:
    """One loss case in this (fresh) process: seconds and peak RSS above the inputs."""
    import torch

    from ctd.collate import Aligner
    from ctd.corpora import load_texts
    from ctd.losses import DistillObjective, LossSpec
    from ctd.zoo import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("gemma3-270m")  # V = 262,144 on both sides
    text = "\n".join(load_texts("wiki-en", split="train", max_bytes=B * 16 * T))
    docs = [text[i * 8 * T : (i + 1) * 8 * T] for i in range(B)]  # each longer than T tokens
    batch = Aligner(tok, tok, max_length=T, windows=False).batch([{"text": d} for d in docs])
    t_head = torch.nn.Linear(hidden, V, bias=False).requires_grad_(False)
    s_head = torch.nn.Linear(hidden, V, bias=False)
    width = batch["student_input_ids"].shape[1]
    th = torch.randn(B, width, hidden)
    sh = torch.randn(B, width, hidden, requires_grad=True)
    chunks, tokens = int(batch["num_chunks"].sum()), int(batch["student_loss_mask"].sum())
    objective = None
    if case not in ("ce_plain", "teacher_forward"):
        objective = DistillObjective([LossSpec(n) for n in case.split("+")], tok, tok)
    base = rss_mib()
    start = time.perf_counter()
    if case == "ce_plain":
        logits = s_head(sh)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, V), batch["student_input_ids"][:, 1:].reshape(-1),
            reduction="none")
        (loss.view(B, -1) * batch["student_loss_mask"][:, 1:]).sum().div(tokens).backward()
    elif case == "teacher_forward":
        with torch.inference_mode():
            t_head(th).log_softmax(-1)  # what a plain teacher forward pass costs in the head
    else:
        out = objective(batch, sh, s_head, th, t_head, chunks, tokens)
        out["loss"].backward()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "peak_rss_delta_mib": round(rss_mib() - base, 1),
            "tokens": tokens, "chunks": chunks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--align-mb", type=float, default=4.0)
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES,
                        help="loss cases to time (ce_plain, teacher_forward and alm+clm are "
                             "needed for the targets)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--pass-mb", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pass_mb:
        print(json.dumps(default_pass(args.pass_mb)))
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.hidden)))
        return
    import torch

    from ctd.numerics import machine

    report = {"command": " ".join(sys.argv), "machine": machine(),
              "aligner": bench_aligner(args.align_mb), "losses": {},
              "shape": {"B": B, "T": T, "V": V, "H": args.hidden},
              "torch_threads": torch.get_num_threads()}
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--hidden", str(args.hidden)],
                             capture_output=True, text=True, check=True)
        report["losses"][case] = json.loads(out.stdout.strip().splitlines()[-1])
    r = report["losses"]
    report["targets"] = {
        "aligner_mb_per_s": report["aligner"]["mb_per_s"]["align"],
        "worker_mb_per_s": report["aligner"]["mb_per_s"]["worker"],
        "tokenize_and_align_pass_mb_per_s": report["aligner"]["mb_per_s"]["cached_pass"],
    }
    if {"ce_plain", "teacher_forward", "alm+clm"} <= r.keys():
        baseline = r["teacher_forward"]["seconds"] + r["ce_plain"]["seconds"]
        report["targets"] |= {
            "alm+clm_time_over_teacher_forward_plus_ce": round(
                r["alm+clm"]["seconds"] / baseline - 1, 3),
            "alm+clm_peak_over_ce": round(
                r["alm+clm"]["peak_rss_delta_mib"] / r["ce_plain"]["peak_rss_delta_mib"] - 1, 3),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
