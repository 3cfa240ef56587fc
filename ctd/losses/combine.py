"""Losses by name, combined with fixed weights or by gradient-magnitude balance.

Chunk losses are divided by the number of non-empty chunks in the GLOBAL batch and token losses
by the global number of scored tokens (both passed in by the trainer, summed over gradient
accumulation and data-parallel ranks), so every micro-batch contributes its share of one
big-batch mean. With merge_by_space_prob the chunk count is the unmerged one: a fixed
normaliser per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ctd.errors import CtdError
from ctd.losses.alm import DISTANCES, alm_hidden_loss, alm_loss
from ctd.losses.clm import clm_loss
from ctd.losses.kd import Mapping, kd_shared_loss, vocab_map
from ctd.losses.logprobs import chunk_rows, keeps_exponentials, token_logprobs, word_start_mask
from ctd.losses.uld import uld_loss

# name -> what it is divided by
LOSSES = {
    "alm": "chunks",
    "alm_hidden": "chunks",
    "clm": "tokens",
    "uld": "tokens",
    "uld_chunked": "chunks",
    "kd_shared": "chunks",
}
BALANCES = ("fixed", "grad_norm")


@dataclass
class LossSpec:
    """One term of the objective. The alm options follow ALM.md's recommended recipe."""

    name: str
    weight: float = 1.0
    distance: str = "binary_ce"
    tau: float = 100.0
    merge_by_space_prob: bool = True
    gamma: float = 0.1
    append_space: bool = True
    mapping: Mapping = "min_edit"  # kd_shared: teacher -> student tokens (ctd.losses.kd)

    def __post_init__(self):
        if self.name not in LOSSES:
            raise CtdError(f"unknown loss '{self.name}'; valid: {', '.join(LOSSES)}")
        if self.distance not in DISTANCES:
            raise CtdError(f"unknown ALM distance '{self.distance}'; valid: {', '.join(DISTANCES)}")


def _keys(specs: list[LossSpec]) -> list[str]:
    names = [s.name for s in specs]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


class DistillObjective:
    """The training objective: a weighted sum of named losses on one aligned batch."""

    def __init__(
        self,
        specs: list[LossSpec],
        teacher_tokenizer,
        student_tokenizer,
        balance: str = "fixed",
    ):
        if not specs:
            raise CtdError(f"no losses given; choose from {', '.join(LOSSES)}")
        if balance not in BALANCES:
            raise CtdError(f"unknown balance '{balance}'; valid: {', '.join(BALANCES)}")
        self.specs = list(specs)
        self.keys = _keys(self.specs)
        self.balance = balance
        self.needs_teacher = any(s.name != "clm" for s in self.specs)
        alms = [s for s in self.specs if s.name == "alm"]
        self.teacher_words = word_start_mask(teacher_tokenizer)
        self.student_words = word_start_mask(student_tokenizer)
        self.teacher_boundary = any(s.merge_by_space_prob or s.append_space for s in alms)
        self.student_boundary = any(s.append_space for s in alms)
        self.teacher_chunk = chunk_rows(len(teacher_tokenizer))
        self.student_chunk = chunk_rows(len(student_tokenizer))
        self.maps = {s.mapping: vocab_map(teacher_tokenizer, student_tokenizer, s.mapping)
                     for s in self.specs if s.name == "kd_shared"}

    def __call__(
        self,
        batch: dict,
        student_hidden: Tensor,
        student_head: Callable[[Tensor], Tensor],
        teacher_hidden: Tensor | None,
        teacher_head: Callable[[Tensor], Tensor] | None,
        global_chunks: int,
        global_tokens: int,
    ) -> dict[str, Tensor]:
        if self.needs_teacher and (teacher_hidden is None or teacher_head is None):
            raise CtdError(f"losses {self.keys} need the teacher's hidden states and head")
        if teacher_hidden is not None and teacher_hidden.is_inference():
            teacher_hidden = teacher_hidden.clone()  # inference tensors cannot enter autograd
        t_chunks, s_chunks = batch["teacher_chunk_ids"], batch["student_chunk_ids"]
        names = {s.name for s in self.specs}
        s_lp = s_bnd = t_lp = t_bnd = None
        if names & {"clm", "alm"}:
            s_lp, s_bnd = token_logprobs(
                student_hidden, student_head, batch["student_input_ids"],
                self.student_words if self.student_boundary else None, self.student_chunk,
                recompute=not keeps_exponentials(student_hidden.shape[:2].numel(),
                                                 len(self.student_words)),
            )
        if "alm" in names:
            with torch.inference_mode():
                t_lp, t_bnd = token_logprobs(
                    teacher_hidden, teacher_head, batch["teacher_input_ids"],
                    self.teacher_words if self.teacher_boundary else None, self.teacher_chunk,
                )
            t_lp, t_bnd = t_lp.clone(), (t_bnd.clone() if t_bnd is not None else None)

        def term(spec: LossSpec) -> Tensor:
            if spec.name == "alm":
                return alm_loss(
                    t_lp, s_lp, t_chunks, s_chunks, spec.distance, spec.tau, t_bnd, s_bnd,
                    spec.gamma if spec.merge_by_space_prob else None, spec.append_space,
                )
            if spec.name == "clm":
                return clm_loss(s_lp, batch["student_loss_mask"])
            if spec.name == "alm_hidden":
                return alm_hidden_loss(teacher_hidden, student_hidden, t_chunks, s_chunks)
            if spec.name == "kd_shared":
                return kd_shared_loss(
                    teacher_hidden, student_hidden, teacher_head, student_head,
                    t_chunks, s_chunks, self.maps[spec.mapping], self.student_chunk,
                )
            return uld_loss(
                teacher_hidden, student_hidden, teacher_head, student_head,
                t_chunks, s_chunks, batch["student_loss_mask"],
                chunked=spec.name == "uld_chunked", chunk=self.teacher_chunk,
            )

        norms = {"chunks": max(int(global_chunks), 1), "tokens": max(int(global_tokens), 1)}
        values = [term(s) / norms[LOSSES[s.name]] for s in self.specs]
        weights = [s.weight * w for s, w in zip(self.specs, self._balance(values, student_hidden),
                                                strict=True)]
        out = {"loss": sum(w * v for w, v in zip(weights, values, strict=True))}
        out.update({k: v.detach() for k, v in zip(self.keys, values, strict=True)})
        return out

    def _balance(self, values: list[Tensor], student_hidden: Tensor) -> list[float]:
        """Fixed: 1 each. grad_norm: 1 / ||d value / d student hidden state|| (no gradient
        through the weight), so each term moves the student's last layer equally."""
        if self.balance == "fixed" or len(values) < 2 or not student_hidden.requires_grad:
            return [1.0] * len(values)
        weights = []
        for v in values:
            (g,) = torch.autograd.grad(v, student_hidden, retain_graph=True, allow_unused=True)
            norm = float(g.norm()) if g is not None else 0.0
            weights.append(1.0 / norm if norm > 0 else 1.0)
        return weights
