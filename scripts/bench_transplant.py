"""Benchmark `ctd transplant` (every method) against mergekit's tokensurgeon; prints JSON.

Pairs: A = Gemma-3-270M onto SmolLM2-135M's tokenizer (donor SmolLM2), B = SmolLM2-135M onto
Gemma-3's tokenizer (donor Gemma-3). Each transplant runs in its own process (wall time and
peak RSS of that process, load and write included, as for mergekit; `method_s` is the method's
own time from the report), then the result's bits per byte on wiki-en validation is measured next
to the base model's. `--exact-sample N` runs exact and fast OMP on N random new tokens in this
process (times extrapolated to all new tokens), compares fast with exact (support overlap,
residuals), and checks exact against plain fp32 OMP on `--reference-sample` of them (identical
picks, and where a row differs, that the first differing picks are an fp32 near-tie). The
report records the machine (`ctd.numerics.machine()`) and the load average around the run.

    .venv/bin/python scripts/bench_transplant.py --pairs A B --out /tmp/bench > bench.json
    # OMP alone on 3,000 pair-B tokens, then as on a CPU without fast bf16 (AVX2 only):
    .venv/bin/python scripts/bench_transplant.py --pairs B --methods --exact-sample 3000
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python scripts/bench_transplant.py --pairs B --methods --exact-sample 3000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

PAIRS = {"A": ("gemma3-270m", "smollm2-135m"), "B": ("smollm2-135m", "gemma3-270m")}
METHODS = ["omp", "omp-fast", "fvt", "mean", "zero", "random", "knn", "focus-donor",
           "tokenadapt-hybrid"]
MERGEKIT = Path("/tmp/mk/bin/mergekit-tokensurgeon")
PUBLISHED_MERGEKIT_A_S = 406.0  # 6 min 46 s, measured on this kind of machine (issue 3)


def timed(cmd: list[str]) -> dict:
    """Run a command in a wrapper process; wall time and the command's peak RSS."""
    wrapper = ("import resource,subprocess,sys,json,time; t=time.time(); "
               "r=subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,"
               " text=True); print(json.dumps({'rc': r.returncode, 'wall_s': time.time()-t, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, "
               "'stderr': r.stderr[-400:]}))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    return json.loads(out.stdout)


def bpb(model_dir: str, texts: list[str]) -> float:
    from ctd.evaluate import bits_per_byte
    from ctd.zoo import load_model, load_tokenizer

    return bits_per_byte(load_model(model_dir), load_tokenizer(model_dir), texts,
                         progress=False).bpb


def compare_sample(base: str, tok: str, n: int, n_ref: int, seed: int = 0) -> dict:
    """Exact and fast OMP on n random new tokens, as `ctd transplant` runs them: time (and
    extrapolated to all new tokens), residuals, support overlap; exact against plain fp32 OMP
    on the first n_ref of them."""
    import numpy as np
    import torch

    from ctd.transplant.methods import EXACT, FAST, RIDGE
    from ctd.transplant.omp import omp
    from ctd.transplant.vocab import match_vocab
    from ctd.zoo import load_model, load_tokenizer

    donor = load_model(tok).get_input_embeddings().weight.detach().float()
    match = match_vocab(load_tokenizer(base), load_tokenizer(tok), new_rows=len(donor))
    new = match.new_ids[match.new_ids < len(donor)]
    shared = match.shared_ids[match.shared_ids < len(donor)]
    pick = np.random.default_rng(seed).choice(new, size=min(n, len(new)), replace=False)
    P, Y = donor[torch.as_tensor(shared)], donor[torch.as_tensor(pick)]
    out = {"sample": len(pick), "new_tokens": len(new), "atoms": len(shared)}
    results = {}
    for name, params in [("exact", EXACT), ("fast", FAST)]:
        t = time.perf_counter()
        results[name] = omp(P, Y, 64, **params, ridge=RIDGE)
        dt = time.perf_counter() - t
        out[name] = {"seconds": dt, "extrapolated_s": dt * len(new) / len(pick),
                     "mean_relative_residual": float(results[name].residual.mean())}
    out["exact"]["fp32_rescreens"] = results["exact"].fallbacks
    e, f = results["exact"].indices, results["fast"].indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 64 for a, b in zip(e, f)]
    out["fast_support_overlap_with_exact"] = float(np.mean(overlap))
    out["fast_residual_over_exact"] = (out["fast"]["mean_relative_residual"]
                                       / out["exact"]["mean_relative_residual"])
    if n_ref:
        out["exact_vs_fp32_omp"] = compare_reference(P, Y[:n_ref], e[:n_ref], RIDGE)
    return out


def compare_reference(P, Y, exact, ridge: float) -> dict:
    """Plain fp32 OMP (`pool=0`) on the same targets: the share of targets with identical picks,
    and for the others the gap between the first differing picks' |correlations| (float64)
    relative to |r| |p|: fp32's own rounding is below D 2^-24."""
    import torch

    from ctd.transplant.omp import omp

    t = time.perf_counter()
    ref = omp(P, Y, 64, pool=0, ridge=ridge).indices
    dt = time.perf_counter() - t
    lam = ridge * float((P * P).sum(1).mean())
    gaps = []
    for i in (ref != exact).any(1).nonzero().flatten().tolist():
        s = int((ref[i] != exact[i]).nonzero()[0])
        A, r = P[ref[i, :s]].double().T, Y[i].double()
        if s:  # the residual both had before they differed
            r = r - A @ torch.linalg.solve(A.T @ A + lam * torch.eye(s, dtype=A.dtype), A.T @ r)
        a, b = P[ref[i, s]].double(), P[exact[i, s]].double()
        gaps.append(float(abs(abs(a @ r) - abs(b @ r)) / (r.norm() * max(a.norm(), b.norm()))))
    return {"targets": len(Y), "seconds": dt, "identical_picks": float((ref == exact).all(1)
            .float().mean()), "differing": len(gaps), "max_first_gap_rel": max(gaps, default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=["A", "B"], choices=list(PAIRS))
    ap.add_argument("--methods", nargs="*", default=METHODS, help="none: OMP samples only")
    ap.add_argument("--skip", nargs="*", default=[], help="PAIR:METHOD to skip, e.g. B:omp")
    ap.add_argument("--mergekit", nargs="*", default=["A"], help="pairs to run mergekit on")
    ap.add_argument("--exact-sample", type=int, default=2000)
    ap.add_argument("--reference-sample", type=int, default=300,
                    help="of the exact sample, tokens also run through plain fp32 OMP")
    ap.add_argument("--max-bytes", type=int, default=200_000)
    ap.add_argument("--no-bpb", action="store_true",
                    help="time the transplants only (to repeat timings side by side quickly)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ctd-bench"))
    args = ap.parse_args()

    from ctd.corpora import load_texts
    from ctd.numerics import machine
    from ctd.zoo import resolve_model

    no_bpb = args.no_bpb or not args.methods
    texts = [] if no_bpb else load_texts("wiki-en", split="validation", max_bytes=args.max_bytes)
    ctd = str(Path(sys.executable).with_name("ctd"))
    env = {k: os.environ[k] for k in ("CTD_FAST_DTYPE", "OMP_NUM_THREADS") if k in os.environ}
    report = {"command": " ".join(sys.argv), "machine": {**machine(), "env": env},
              "load_avg_start": os.getloadavg(), "bpb_text": f"wiki-en validation, first "
              f"{args.max_bytes} bytes", "pairs": {}}
    for pair in args.pairs:
        base, tok = PAIRS[pair]
        rows = {} if no_bpb else {"base_bpb": bpb(resolve_model(base), texts)}
        print(f"[{pair}] base bpb {rows.get('base_bpb')}", file=sys.stderr)
        for method in args.methods:
            if f"{pair}:{method}" in args.skip:
                continue
            out = args.out / f"{pair}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            flags = ["--method", "omp", "--fast", "true"] if method == "omp-fast" else [
                "--method", method]
            run = timed([ctd, "transplant", "--base", base, "--tokenizer", tok, "--out", str(out),
                         *flags])
            if run["rc"] == 0:
                rep = json.loads((out / "transplant_report.json").read_text())
                if not no_bpb:
                    run["bpb"] = bpb(str(out), texts)
                    run["bpb_ratio"] = run["bpb"] / rows["base_bpb"]
                run["sides"] = rep["sides"]
                run["method_s"] = rep["timings"]["method_s"]
                del run["stderr"]
                shutil.rmtree(out, ignore_errors=True)
            rows[method] = run
            print(f"[{pair}] {method}: {json.dumps(run)[:300]}", file=sys.stderr)
        if pair in args.mergekit:
            if MERGEKIT.exists():
                out = args.out / f"{pair}-mergekit"
                shutil.rmtree(out, ignore_errors=True)
                run = timed([str(MERGEKIT), resolve_model(base), resolve_model(tok), str(out),
                             "-a", "omp", "-k", "64"])
                if run["rc"] == 0:
                    if not no_bpb:
                        run["bpb"] = bpb(str(out), texts)
                        run["bpb_ratio"] = run["bpb"] / rows["base_bpb"]
                    del run["stderr"]
                rows["mergekit-omp-k64"] = run
            else:
                rows["mergekit-omp-k64"] = {"installed": False,
                                            "published_wall_s": PUBLISHED_MERGEKIT_A_S}
            print(f"[{pair}] mergekit: {rows['mergekit-omp-k64']}", file=sys.stderr)
        if args.exact_sample:
            rows["exact_vs_fast_sample"] = compare_sample(base, tok, args.exact_sample,
                                                          args.reference_sample)
        report["pairs"][pair] = rows
        print(json.dumps(report, indent=1), file=sys.stderr)
    report["load_avg_end"] = os.getloadavg()
    report["peak_rss_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
