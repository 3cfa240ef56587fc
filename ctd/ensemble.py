"""Several models on one tokenizer, used as one model.

Once models share a tokenizer (after `ctd transplant`), their next-token distributions live over
the same vocabulary and can be averaged. The wrapper returns log-probabilities as `logits`, so
every consumer of a causal LM (`bits_per_byte`, `choice_nll`/`multiple_choice`, `greedy_generate`)
works unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ctd.errors import CtdError

Mode = Literal["probs", "logits"]


@dataclass
class EnsembleOutput:
    logits: torch.Tensor  # normalised log-probabilities [B, T, V]
    cache: list | None = None  # one cache per member


class Ensemble(nn.Module):
    """Average next-token probabilities (`probs`, the default) or logits of member models.

    An ensemble of one model is that model with normalised log-probabilities as logits: the
    harness scores members and ensembles through the same code that way."""

    def __init__(self, members: list[nn.Module], mode: Mode = "probs",
                 weights: list[float] | None = None):
        super().__init__()
        if not members:
            raise CtdError("an ensemble needs at least one model")
        sizes = {m.get_output_embeddings().weight.shape[0] for m in members}
        if len(sizes) != 1:
            raise CtdError(f"ensemble members have different vocabularies ({sorted(sizes)}); "
                           "transplant them onto one tokenizer first (ctd transplant)")
        if mode not in ("probs", "logits"):
            raise CtdError(f"unknown ensemble mode '{mode}'; use probs or logits")
        weights = weights or [1.0] * len(members)
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise CtdError("ensemble weights must be one non-negative number per member")
        self.members = nn.ModuleList(members)
        self.mode = mode
        self.register_buffer("weights", torch.tensor(weights) / sum(weights), persistent=False)
        # The shortest context is the ensemble's context.
        self.config = min((m.config for m in members),
                          key=lambda c: getattr(c, "max_position_embeddings", math.inf))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: list | None = None,
                use_cache: bool = False) -> EnsembleOutput:
        caches = cache or [None] * len(self.members)
        outs = [m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  cache=c, use_cache=use_cache) for m, c in zip(self.members, caches)]
        logits = torch.stack([o.logits.float() for o in outs])  # [M, B, T, V]
        w = self.weights.view(-1, 1, 1, 1).to(logits)
        if self.mode == "probs":
            mixed = torch.logsumexp(logits.log_softmax(-1) + w.log(), dim=0)
        else:
            mixed = (logits * w).sum(0).log_softmax(-1)
        new_caches = [o.cache for o in outs] if use_cache else None
        return EnsembleOutput(logits=mixed, cache=new_caches)

    def get_output_embeddings(self) -> nn.Module:
        return self.members[0].get_output_embeddings()


def load_members(members: list[str], tokenizer: str, dtype: torch.dtype = torch.float32
                 ) -> tuple[dict[str, nn.Module], object]:
    """Load models by any name ctd accepts and the tokenizer they must all use; a member
    with a tokenizer of its own must use exactly `tokenizer`."""
    from ctd.zoo import load_model, load_tokenizer

    tok = load_tokenizer(tokenizer)
    models = {name: load_model(name, dtype) for name in members}
    for name, model in models.items():
        try:
            own = load_tokenizer(name).get_vocab()
        except CtdError:  # a member without its own tokenizer: only its rows can be checked
            own = tok.get_vocab()
        if own != tok.get_vocab() or model.get_output_embeddings().weight.shape[0] < len(tok):
            raise CtdError(f"{name} does not use the tokenizer {tokenizer}; transplant it first")
    return models, tok


def compare(members: list[str], tokenizer: str, texts: list[str], mode: Mode = "probs",
            gsm_rows: list[dict] = (), shots: list[dict] = (), max_new_tokens: int = 200
            ) -> dict[str, dict]:
    """bpb (and gsm-symbolic accuracy when rows are given) of each member and of the ensemble,
    all read through the one shared `tokenizer`."""
    from ctd.evaluate import bits_per_byte, gsm_accuracy

    if len(members) < 2:
        raise CtdError("comparing an ensemble with its members needs at least two models")
    models, tok = load_members(members, tokenizer)
    models[f"ensemble ({mode})"] = Ensemble(list(models.values()), mode)
    results = {}
    for name, model in models.items():
        results[name] = {"bpb": bits_per_byte(model, tok, texts).bpb}
        if gsm_rows:
            results[name]["gsm_accuracy"] = gsm_accuracy(model, tok, list(gsm_rows), list(shots),
                                                         max_new_tokens)["accuracy"]
    return results
