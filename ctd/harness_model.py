"""`lm_eval --model ctd-ensemble`: models that share a tokenizer, as one harness model.

Importing this module registers the model type with lm-eval's plug-in registry
(`python -m ctd.harness` does it before lm_eval reads its command line). Model arguments:
`models=A|B|...` (zoo names, HF directories, .gguf files), `tokenizer=T` (default: the first
member's), `mode=probs|logits`, `weights=3|1`, `window=N` (rolling windows, default
min(1024, context)), `dtype=float32|bfloat16`, `max_gen_toks=N`.

Requests are scored the way ctd scores text, so the harness's numbers equal ctd's:
loglikelihood as `ctd.evaluate.choice_nll` (the document start token, then context and
continuation tokenized separately), loglikelihood_rolling in the windows of
`ctd.evaluate.bits_per_byte`, generate_until by greedy `ctd.evaluate.greedy_generate`. One
member (`models=A`) is that model scored this way, which is how to compare members with their
ensemble on equal terms. Chat templates (`--apply_chat_template`) are not supported: ctd reads
special-token strings in text as text.
"""

from __future__ import annotations

# lm-eval fills its model registry with its own models only while the registry is empty, so
# they are imported before ours is registered (else `--model hf` would be unknown).
import lm_eval.models  # noqa: F401
import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ctd.ensemble import Ensemble, load_members
from ctd.errors import CtdError
from ctd.evaluate import greedy_generate
from ctd.harness import rolling_nll
from ctd.tokens import doc_start_id, encode
from ctd.zoo import model_context

# Log-probabilities are materialised per batch: keep members x tokens x vocab under this.
_LOGIT_BUDGET = 1 << 28


def _split(value) -> list[str]:
    return [v for v in str(value).split("|") if v]


@register_model("ctd-ensemble")
class EnsembleLM(LM):
    """ctd.ensemble.Ensemble behind lm-eval's LM interface."""

    def __init__(self, models: str, tokenizer: str | None = None, mode: str = "probs",
                 weights: str | None = None, window: int | None = None,
                 dtype: str = "float32", max_gen_toks: int = 256, batch_size: int | str = 8,
                 device: str | None = None, max_batch_size: int | None = None) -> None:
        # lm-eval passes batch_size, max_batch_size and device; batches here are also capped
        # by the memory their log-probabilities take, so max_batch_size adds nothing
        super().__init__()
        names = _split(models)
        if not names:
            raise CtdError("ctd-ensemble needs models=A|B|... (zoo names or model directories)")
        if dtype not in ("float32", "bfloat16"):
            raise CtdError(f"dtype {dtype!r}: use float32 or bfloat16")
        members, self.tokenizer = load_members(names, tokenizer or names[0], getattr(torch, dtype))
        self.model = Ensemble(list(members.values()), mode,
                              [float(w) for w in _split(weights)] if weights else None).eval()
        if device and device != "cpu" and (not device.startswith("cuda")
                                           or torch.cuda.is_available()):
            self.model.to(device)
        self.window = int(window) if window else None
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding produces it), with the token
        layout of ctd.evaluate.choice_nll: [document start] + context + continuation."""
        start = doc_start_id(self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else start
        rows = []
        for context, continuation in (r.args for r in requests):
            ctx = encode(self.tokenizer, [context])[0].ids if context else np.zeros(0, np.int64)
            cont = encode(self.tokenizer, [continuation])[0].ids
            rows.append((np.concatenate([[start], ctx, cont]), 1 + len(ctx)))
        context = model_context(self.model)
        if max(len(ids) for ids, _ in rows) > context:
            raise CtdError(f"context + continuation is longer than the model's context "
                           f"({context} tokens); shorten the task's prompts")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        vocab = len(self.tokenizer) * len(self.model.members)
        i = 0
        while i < len(order):
            width = len(rows[order[i]][0])
            n = max(1, min(self.batch_size, _LOGIT_BUDGET // (width * vocab)))
            batch = order[i : i + n]
            for j, res in zip(batch, self._score([rows[j] for j in batch], pad)):
                results[j] = res
            i += n
        return results

    def _score(self, rows: list[tuple[np.ndarray, int]], pad: int) -> list[tuple[float, bool]]:
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (row, _) in enumerate(rows):
            ids[r, : len(row)] = torch.from_numpy(row)
            mask[r, : len(row)] = 1
        logp = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = logp[:, :-1].float().log_softmax(-1).cpu()
        out = []
        for r, (row, first) in enumerate(rows):
            span = slice(first - 1, len(row) - 1)  # positions predicting the continuation
            target = ids[r, first : len(row)]
            lp = logp[r, span].gather(1, target[:, None])[:, 0].double().sum()
            out.append((float(lp), bool((logp[r, span].argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in ctd's bpb windows (`window=`), opened by the
        document start token."""
        texts = [r.args[0] for r in requests]
        return [-n for n in rolling_nll(self.model, self.tokenizer, texts, window=self.window,
                                        batch_size=self.batch_size)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (ctd.evaluate.greedy_generate), cut at the task's `until`."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise CtdError("ctd-ensemble generates greedily; drop do_sample/temperature "
                               "from --gen_kwargs")
            until = kwargs.get("until") or []
            key = (tuple([until] if isinstance(until, str) else until),
                   int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for (until, max_new), idx in groups.items():
            texts = greedy_generate(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                                    max_new, self.batch_size, stop=until, progress=False)
            for i, text in zip(idx, texts):
                out[i] = text
        return out
