"""Step-0 diagnostics of ALM on one real batch; prints JSON.

Teacher Gemma-3-270M on its tokenizer, student its OMP transplant onto SmolLM2's tokenizer
(`--student`, default: made under `--out` with `ctd transplant`), one batch of wiki-en
validation windows. Reports:
- identities: with merging and the appended space off, the chunks' log-likelihoods sum to each
  side's log-likelihood, reproducing the batch's teacher and student bits per byte exactly;
- how related the two sides' chunk log-likelihoods are (Pearson correlation), and how that
  collapses when the student's chunk ids are shifted by one (a misalignment would look so);
- ||grad ALM|| / ||grad CLM|| and the cosine between the two gradients, for the embeddings and
  the body separately; the fraction of chunks the student finds likelier than the teacher.

    python scripts/diagnose_alm.py --out runs/diagnose
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

from ctd.collate import Aligner
from ctd.corpora import load_texts
from ctd.evaluate import bits_per_byte, target_logprobs
from ctd.losses.alm import alm_loss, chunk_logliks
from ctd.losses.clm import clm_loss
from ctd.losses.logprobs import hidden_states, output_head, token_logprobs, word_start_mask
from ctd.numerics import machine
from ctd.zoo import load_model, load_tokenizer


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def _grads(loss: torch.Tensor, params: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    flat = [p for ps in params.values() for p in ps]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out, i = {}, 0
    for name, ps in params.items():
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                               for p, g in zip(ps, grads[i : i + len(ps)], strict=True)])
        i += len(ps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="gemma3-270m")
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--student", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("runs/diagnose"))
    args = ap.parse_args()
    student_dir = args.student
    if student_dir is None:
        from ctd.transplant.run import transplant

        student_dir = args.out / "transplant"
        if not student_dir.exists():
            with contextlib.redirect_stdout(sys.stderr):
                transplant(args.teacher, args.tokenizer, student_dir, "omp")
    t_tok, s_tok = load_tokenizer(args.teacher), load_tokenizer(student_dir)
    texts = load_texts("wiki-en", "validation", max_bytes=args.batch_size * 4 * args.max_length)
    texts = [t for t in texts if t.strip()][: args.batch_size]
    batch = Aligner(t_tok, s_tok, args.max_length, windows=False).batch(
        [{"text": t} for t in texts])
    teacher, student = load_model(args.teacher).eval(), load_model(student_dir).eval()
    tc, sc = batch["teacher_chunk_ids"], batch["student_chunk_ids"]
    n_bytes = int(batch["num_bytes"].sum())

    # 1. identities: chunk log-likelihoods reproduce each side's bits per byte
    with torch.no_grad():
        t_lp = target_logprobs(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        s_lp = target_logprobs(student, batch["student_input_ids"], batch["student_attention_mask"])
    lt, ls, exists = chunk_logliks(t_lp, s_lp, tc, sc)
    covered = [t.encode()[: int(b)].decode("utf-8", "ignore") for t, b in
               zip(texts, batch["num_bytes"], strict=True)]  # the windows' text
    bpb = {name: bits_per_byte(model, tok, covered, window=args.max_length, progress=False).bpb
           for name, model, tok in (("teacher", teacher, t_tok), ("student", student, s_tok))}
    from_chunks = {"teacher": -float(lt[exists].sum()) / math.log(2) / n_bytes,
                   "student": -float(ls[exists].sum()) / math.log(2) / n_bytes}
    token_nll = {"teacher": -float((t_lp * (tc >= 0)).sum()),
                 "student": -float((s_lp * (sc >= 0)).sum())}

    # 2. the two sides' chunk log-likelihoods: related, and not when shifted by one chunk
    shifted = torch.where(sc >= 0, sc + 1, sc)  # student chunk c read as chunk c + 1
    _, ls_shift, exists_shift = chunk_logliks(t_lp, s_lp, tc, shifted)
    both = exists & exists_shift

    # 3. gradients of ALM (the recommended options) and CLM at step 0
    student.train()
    params = {"embeddings": [student.get_input_embeddings().weight],
              "body": [p for n, p in student.named_parameters() if "embed" not in n
                       and "lm_head" not in n]}
    sh = hidden_states(student, batch["student_input_ids"], batch["student_attention_mask"])
    s_lp_g, s_bnd = token_logprobs(sh, output_head(student), batch["student_input_ids"],
                                   word_start_mask(s_tok))
    with torch.no_grad():
        th = hidden_states(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        t_lp2, t_bnd = token_logprobs(th, output_head(teacher), batch["teacher_input_ids"],
                                      word_start_mask(t_tok))
    alm = alm_loss(t_lp2, s_lp_g, tc, sc, teacher_boundary=t_bnd, student_boundary=s_bnd)
    alm = alm / max(int(batch["num_chunks"].sum()), 1)
    clm = clm_loss(s_lp_g, batch["student_loss_mask"]) / max(int(batch["student_loss_mask"]
                                                                  .sum()), 1)
    g_alm, g_clm = _grads(alm, params), _grads(clm, params)
    grads = {name: {"alm_norm": float(g_alm[name].norm()), "clm_norm": float(g_clm[name].norm()),
                    "alm_over_clm": float(g_alm[name].norm() / g_clm[name].norm()),
                    "cosine": float(torch.nn.functional.cosine_similarity(
                        g_alm[name], g_clm[name], dim=0))} for name in params}
    result = {
        "command": " ".join(sys.argv), "machine": machine(),
        "batch": {"windows": len(texts), "max_length": args.max_length, "bytes": n_bytes,
                  "chunks": int(exists.sum()), "teacher_tokens": int((tc >= 0).sum()),
                  "student_tokens": int((sc >= 0).sum())},
        "identities": {"bpb_from_chunks": from_chunks, "bpb_ctd_eval": bpb,
                       "chunk_sum_minus_token_nll": {
                           "teacher": -float(lt[exists].sum()) - token_nll["teacher"],
                           "student": -float(ls[exists].sum()) - token_nll["student"]}},
        "chunk_loglik_correlation": _corr(lt[exists], ls[exists]),
        "chunk_loglik_correlation_shifted_by_one": _corr(lt[both], ls_shift[both]),
        "fraction_student_likelier": float((ls[exists] > lt[exists]).double().mean()),
        "mean_abs_chunk_gap_nats": float((lt - ls).abs()[exists].mean()),
        "step0_losses": {"alm": alm.item(), "clm": clm.item()},
        "gradients": grads,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnose_alm.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
