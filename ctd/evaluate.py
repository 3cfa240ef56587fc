"""Tokenizer-independent yardsticks: bits per byte (and, for recipes, answer accuracy).

bpb = (sum of token NLL in nats) / ln 2 / (UTF-8 bytes of the scored text). Per-token perplexity
cannot compare two tokenizers; bpb can, because every model is charged for the same bytes.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchmetrics import Metric

from ctd.errors import CtdError
from ctd.losses.logprobs import chunk_rows, hidden_states, output_head, token_logprobs
from ctd.report import progress as progress_bar
from ctd.tokens import Unencodable, doc_start_id, encode, encode_or_explain
from ctd.zoo import model_context


class BitsPerByte(Metric):
    """Summed NLL (nats) / ln 2 / scored UTF-8 bytes; sums across ranks. The one bits-per-byte
    of ctd: `bits_per_byte` (ctd eval, recipes) and training's validation both use it."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, num_bytes: torch.Tensor) -> None:
        self.nll += nll.double().sum()
        self.bytes += num_bytes.sum()

    def compute(self) -> torch.Tensor:
        return self.nll / math.log(2) / self.bytes.clamp(min=1)


def target_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T]: log p(input_ids[:, i] | input_ids[:, <i]) (0 at i = 0, which nothing predicts).

    Transformers models go through their last hidden state in chunks of positions, so a [B, T, V]
    logits tensor never exists; anything else (an `Ensemble`) through its `.logits`."""
    if hasattr(model, "get_decoder"):
        hidden = hidden_states(model, input_ids, attention_mask)
        return token_logprobs(hidden, output_head(model), input_ids,
                              chunk=chunk_rows(model.get_output_embeddings().weight.shape[0]))[0]
    logp = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    picked = logp.log_softmax(-1).gather(2, input_ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(picked, (1, 0))


@dataclass
class Bpb:
    bpb: float
    nll_nats: float
    bytes: int
    tokens: int
    documents: int
    windows: int
    skipped_documents: int  # the tokenizer could not reproduce them byte-exactly
    skipped_bytes: int
    skipped_examples: list[str]  # the first offending character of up to 3 of them
    normalised_documents: int  # changed by the tokenizer's own normalisation (e.g. NFC)
    seconds: float

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / max(self.bytes, 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_byte"] = self.tokens_per_byte
        d["bytes_per_second"] = self.bytes / max(self.seconds, 1e-9)
        d["tokens_per_second"] = self.tokens / max(self.seconds, 1e-9)
        return d


def windows(ids: np.ndarray, start: int, window: int) -> list[np.ndarray]:
    """Cut a document's tokens into windows of at most `window` tokens, each starting with the
    document-start token (whose own prediction is never scored)."""
    step = window - 1
    return [np.concatenate([[start], ids[i : i + step]]) for i in range(0, len(ids), step)]


@torch.no_grad()
def window_nll(model, batch: list[np.ndarray], pad_id: int,
               first: list[int] | None = None) -> torch.Tensor:
    """Summed NLL (nats, fp64) of tokens first[i].. of each window (default 1: position 0 is
    context only)."""
    device = next(model.parameters()).device
    width = max(len(w) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    scored = torch.zeros_like(ids)
    for row, w in enumerate(batch):
        ids[row, : len(w)] = torch.from_numpy(np.asarray(w))
        mask[row, : len(w)] = 1
        scored[row, (first[row] if first else 1) : len(w)] = 1
    lp = target_logprobs(model, ids.to(device), mask.to(device))
    return -(lp.double() * scored.to(device)).sum(dim=1).cpu()


def choice_nll(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """NLL (nats) of each choice as the continuation of `context`; context and choices are
    tokenized separately (as lm-evaluation-harness does), so every choice sees the same
    context tokens. Works for any causal LM, an `Ensemble` included."""
    if not choices:
        raise CtdError("no choices to score")
    start = doc_start_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    ctx = encode(tokenizer, [context])[0].ids if context else np.zeros(0, dtype=np.int64)
    batch = [np.concatenate([[start], ctx, e.ids]) for e in encode(tokenizer, choices)]
    if max(map(len, batch)) > model_context(model):
        raise CtdError(f"context + choice is longer than the model's context "
                       f"({model_context(model)} tokens); shorten the context")
    return window_nll(model, batch, pad, [1 + len(ctx)] * len(batch)).tolist()


def multiple_choice(model, tokenizer, context: str, choices: list[str]) -> int:
    """Index of the choice with the lowest NLL per UTF-8 byte (comparable across tokenizers,
    and not biased towards short choices as a plain sum would be)."""
    nll = choice_nll(model, tokenizer, context, choices)
    return int(np.argmin([n / max(len(c.encode()), 1) for n, c in zip(nll, choices, strict=True)]))


def bits_per_byte(
    model,
    tokenizer,
    texts: list[str],
    window: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Bpb:
    """Score `texts` with `model` read through `tokenizer`; bytes are counted on the texts.

    `window` defaults to min(1024, the model's context); a larger explicit one is refused.
    Documents the tokenizer cannot reproduce byte-exactly are skipped and counted, as in
    training (ctd.collate).
    """
    context = model_context(model)
    window = min(1024, context) if window is None else window
    if window < 2:
        raise CtdError(f"window {window} is too small; use at least 2 tokens")
    if window > context:
        raise CtdError(f"window {window} is larger than the model's context ({context}); "
                       f"pass --window {context} or less")
    if not texts:
        raise CtdError("nothing to score: the text list is empty")
    start = doc_start_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    t0 = time.perf_counter()
    work: list[np.ndarray] = []
    n_bytes = n_tokens = normalised = skipped_bytes = 0
    skipped: list[str] = []
    for text, enc in zip(texts, encode_or_explain(tokenizer, texts), strict=True):
        if isinstance(enc, Unencodable):
            skipped.append(f"{enc.char!r} at byte {enc.offset}")
            skipped_bytes += len(text.encode())
            continue
        normalised += int(enc.lengths.sum()) != len(text.encode())
        n_bytes += len(text.encode())
        n_tokens += len(enc.ids)
        work.extend(windows(enc.ids, start, window))
    if not work:
        raise CtdError("no document could be tokenized byte-exactly; nothing was scored")
    order = sorted(range(len(work)), key=lambda i: -len(work[i]))  # similar lengths together
    nll = torch.zeros((), dtype=torch.float64)
    model.eval()
    with progress_bar(disable=not progress, transient=True) as bar:
        task = bar.add_task("bpb", total=len(work), info="")
        for i in range(0, len(order), batch_size):
            batch = [work[j] for j in order[i : i + batch_size]]
            nll += window_nll(model, batch, pad).sum()
            bar.update(task, advance=len(batch), info=f"{sum(len(w) for w in batch)} tokens")
    metric = BitsPerByte()
    metric.update(nll, torch.tensor(n_bytes))
    return Bpb(
        bpb=float(metric.compute()), nll_nats=float(metric.nll), bytes=n_bytes, tokens=n_tokens,
        documents=len(texts) - len(skipped), windows=len(work), skipped_documents=len(skipped),
        skipped_bytes=skipped_bytes, skipped_examples=skipped[:3], normalised_documents=normalised,
        seconds=time.perf_counter() - t0,
    )


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                    batch_size: int = 16, stop: tuple[str, ...] = (), progress: bool = True
                    ) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches, KV cache).

    Works for any causal LM whose forward takes (input_ids, attention_mask, position_ids,
    cache, use_cache) and returns `.logits`/`.cache` (transformers 5), so single models and
    `ctd.ensemble.Ensemble` share it. Generation of a row ends at EOS or at any `stop` string.
    """
    device = next(model.parameters()).device
    start = doc_start_id(tokenizer)
    eos = {t for t in (tokenizer.eos_token_id, start) if t is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with progress_bar(disable=not progress, transient=True) as bar:
        task = bar.add_task("generate", total=len(prompts), info="")
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            encs = [[start, *e.ids.tolist()] for e in encode(tokenizer, [prompts[i] for i in rows])]
            width = max(len(e) for e in encs)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encs], device=device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encs], device=device)
            new = torch.empty(len(rows), 0, dtype=torch.long, device=device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            past, step_ids = None, ids
            for _ in range(max_new_tokens):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                            cache=past, use_cache=True)
                past = out.cache
                nxt = out.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                new = torch.cat([new, nxt[:, None]], dim=1)
                done |= torch.isin(nxt, torch.tensor(sorted(eos), device=device))
                if stop and new.shape[1] % 8 == 0:
                    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                    done |= torch.tensor([any(s in t for s in stop) for t in texts], device=device)
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                outputs[i] = text if cut < 0 else text[:cut]
            bar.update(task, advance=len(rows))
    return outputs


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The number after `####` (GSM8K's answer marker), else the last number in the text."""
    tail = text.split("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = (numbers[0] if "####" in text else numbers[-1]).replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def gsm_accuracy(model, tokenizer, rows: list[dict], shots: list[dict] = (),
                 max_new_tokens: int = 256, batch_size: int = 16, progress: bool = True) -> dict:
    """Exact-match accuracy of greedy answers on gsm-symbolic rows (question/solution/answer).

    `shots` are worked examples put before each question (the same for every model compared).
    """
    from ctd.corpora import gsm_prompt

    prefix = "".join(gsm_prompt(s["question"]) + s["solution"] + "\n\n" for s in shots)
    prompts = [prefix + gsm_prompt(r["question"]) for r in rows]
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                            stop=("\n\nQuestion:", "Question:"), progress=progress)
    answers = [extract_answer(t) for t in texts]
    correct = [a == str(r["answer"]) for a, r in zip(answers, rows)]
    return {"accuracy": sum(correct) / len(rows), "correct": sum(correct), "n": len(rows),
            "examples": [{"question": r["question"][:200], "generated": t[-300:], "answer": r["answer"],
                          "predicted": a} for r, t, a in list(zip(rows, texts, answers))[:5]]}
