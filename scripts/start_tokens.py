"""Bits per byte of a model per start token, and its chat use; prints JSON.

Tools open a text with different tokens (ctd: the document start; lm-eval: the declared bos;
chat templates: their turn marker; some pipelines: the eos). A model should read a text the
same whichever of them comes first. For each start token of the tokenizer
(`ctd.transplant.vocab.start_tokens`) this scores the same documents in the windows of
`ctd eval`, opened by that token; with a chat template it also scores assistant turns of
conversations in that template (as chat pipelines tokenize them: no extra start token) and
greedily answers one question.

    python scripts/start_tokens.py --model runs/x/model [--max-bytes 50000] [--chats 12]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from ctd.corpora import load_corpus, take_bytes
from ctd.evaluate import window_nll
from ctd.harness import bpb, rolling_nll
from ctd.numerics import machine
from ctd.tokens import encode
from ctd.transplant.vocab import start_tokens
from ctd.zoo import load_model, load_tokenizer

QUESTION = "What is the capital of France?"


def _sentences(text: str, limit: int = 1200) -> str:
    """At most `limit` bytes of a text, cut after a sentence where it is longer."""
    if len(text.encode()) <= limit:
        return text
    cut = text.encode()[:limit].decode("utf-8", "ignore")
    return cut[: cut.rfind(". ") + 1] or cut


def chat_use(model, tok, rows: list[dict]) -> dict:
    """bpb of assistant turns in the tokenizer's chat template, the NLL of the token that ends
    a turn, and a greedy answer to one question."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    content_nll = end_nll = 0.0
    n_bytes = 0
    for row in rows:
        user = {"role": "user", "content": f"Tell me about {row['title']}." if row.get("title")
                else "Write a paragraph."}
        content = _sentences(row["text"])
        prefix = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template([user, {"role": "assistant", "content": content}],
                                       tokenize=False)
        suffix = full[len(prefix) + len(content):]
        p = tok(prefix, add_special_tokens=False)["input_ids"]
        c = encode(tok, [content])[0].ids.tolist()
        end = tok(suffix, add_special_tokens=False)["input_ids"][:1]
        ids = np.asarray(p + c + end, dtype=np.int64)
        content_nll += float(window_nll(model, [ids[:-1]], pad, [len(p)])[0])
        end_nll += float(window_nll(model, [ids], pad, [len(ids) - 1])[0])
        n_bytes += len(content.encode())
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=40, do_sample=False)
    return {"conversations": len(rows), "assistant_bytes": n_bytes,
            "assistant_bpb": content_nll / math.log(2) / max(n_bytes, 1),
            "turn_end_nll": end_nll / max(len(rows), 1),
            "question": QUESTION,
            "greedy_answer": tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="zoo name or model directory")
    ap.add_argument("--tokenizer", help="default: the model's own")
    ap.add_argument("--corpus", default="wiki-en")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--max-bytes", type=int, default=50_000)
    ap.add_argument("--window", type=int, help="tokens per window (default as ctd eval)")
    ap.add_argument("--chats", type=int, default=12, help="conversations (0: no chat check)")
    ap.add_argument("--threads", type=int, help="torch threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model).eval()
    rows = load_corpus(args.corpus, args.split).to_list()
    texts = take_bytes([r["text"] for r in rows], args.max_bytes)
    starts = []
    for tid, roles in start_tokens(tok).items():
        score = bpb(rolling_nll(model, tok, texts, start=tid, window=args.window), texts)
        starts.append({"id": tid, "token": tok.convert_ids_to_tokens(tid), "roles": roles,
                       "bpb": score})
    reference = starts[0]["bpb"]  # the document start, what `ctd eval` uses
    for s in starts:
        s["vs_document_start"] = s["bpb"] / reference - 1
    chats = rows[len(texts): len(texts) + args.chats]
    result = {
        "machine": machine(), "model": args.model, "tokenizer": args.tokenizer or args.model,
        "corpus": args.corpus, "split": args.split, "documents": len(texts),
        "bytes": sum(len(t.encode()) for t in texts),
        "start_tokens": starts,
        "spread": max(s["bpb"] for s in starts) / min(s["bpb"] for s in starts) - 1,
        "chat": chat_use(model, tok, chats) if tok.chat_template and chats else None,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
