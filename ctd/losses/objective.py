"""The training objective: losses by name (one registry), combined by fixed or balanced weights.

A loss is one `Loss` entry in `LOSSES`: its function, what it is divided by, what of the teacher
it needs, and which `LossSpec` options it reads. Everything else (validation, whether a run
loads the teacher or reads the teacher cache, the CLI's help) derives from the entries; adding a
loss is one entry here plus its test.

Normalisation: chunk losses are divided by the non-empty chunks of the GLOBAL batch, token losses
by its scored tokens (both passed in by the trainer, summed over accumulation and data-parallel
ranks), so every micro-batch contributes its share of one big-batch mean. With
merge_by_space_prob the chunk count is the unmerged one: a fixed normaliser per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from ctd.errors import CtdError
from ctd.losses.alm import DISTANCES, alm_hidden_loss, alm_loss
from ctd.losses.clm import clm_loss
from ctd.losses.kd import Mapping, kd_shared_loss, vocab_map
from ctd.losses.logprobs import chunk_rows, keeps_exponentials, token_logprobs, word_start_mask
from ctd.losses.uld import uld_loss

# What of the teacher a loss reads, in increasing order of cost: nothing; its token log-probs
# and word-boundary log-probs (two numbers per teacher token: the teacher cache holds them); its
# hidden states and output head (the live teacher).
TeacherNeed = Literal["none", "logprobs", "hidden"]
_NEED_ORDER = ("none", "logprobs", "hidden")
# fixed: weights as given. grad_norm: each term weighted by 1 / ||its gradient w.r.t. the
# student's last layer's parameters||, the weights normalised to sum to one (so the combined
# gradient keeps the size of one loss). grad_norm_hidden: 1 / ||its gradient w.r.t. the last
# hidden state||, not normalised.
Balance = Literal["fixed", "grad_norm", "grad_norm_hidden"]


@dataclass
class LossSpec:
    """One term of the objective: a registered loss, its weight, and its options (each loss
    reads only its own; the alm defaults are the ALM paper's recommended recipe).

    Args:
        name: a registered loss (ctd.losses.objective.LOSSES).
        weight: fixed weight (multiplies the balanced one).
        distance: alm: binary_ce, abs, reverse_binary_kl or binary_kl_temp_limit.
        tau: alm: temperature of the binarised distances.
        merge_by_space_prob: alm: merge chunks the teacher does not end at a word boundary.
        gamma: alm: boundary probability above which a chunk closes.
        append_space: alm: compare "chunk, then a word boundary" on both sides.
        mapping: kd_shared: teacher -> student tokens, exact or min_edit.
    """

    name: str
    weight: float = 1.0
    distance: str = "binary_ce"
    tau: float = 100.0
    merge_by_space_prob: bool = True
    gamma: float = 0.1
    append_space: bool = True
    mapping: Mapping = "min_edit"

    def __post_init__(self):
        loss = LOSSES.get(self.name)
        if loss is None:
            raise CtdError(f"unknown loss '{self.name}'; valid: {', '.join(LOSSES)}")
        defaults = LossSpec.__dataclass_fields__
        for f in dataclasses.fields(self):
            if f.name not in ("name", "weight", *loss.options) \
                    and getattr(self, f.name) != defaults[f.name].default:
                raise CtdError(f"loss '{self.name}' has no option '{f.name}' (its options: "
                               f"{', '.join(loss.options) or 'none'})")
        if self.distance not in DISTANCES:
            raise CtdError(f"unknown ALM distance '{self.distance}'; valid: {', '.join(DISTANCES)}")
        if self.mapping not in ("exact", "min_edit"):
            raise CtdError(f"unknown kd_shared mapping '{self.mapping}'; valid: exact, min_edit")


class Inputs:
    """What the losses of one batch read, each computed at most once, on demand."""

    def __init__(self, objective: DistillObjective, batch: dict, student_hidden: Tensor,
                 student_head: Callable[[Tensor], Tensor], teacher_hidden: Tensor | None,
                 teacher_head: Callable[[Tensor], Tensor] | None):
        self.objective, self.batch = objective, batch
        self.student_hidden, self.student_head = student_hidden, student_head
        if teacher_hidden is not None and teacher_hidden.is_inference():
            teacher_hidden = teacher_hidden.clone()  # inference tensors cannot enter autograd
        self.teacher_hidden, self.teacher_head = teacher_hidden, teacher_head

    @cached_property
    def student(self) -> tuple[Tensor, Tensor | None]:
        """The student's token log-probs and (when an alm term appends a space) word-boundary
        log-probs, [B, T_s] each."""
        o = self.objective
        return token_logprobs(
            self.student_hidden, self.student_head, self.batch["student_input_ids"],
            o.student_words if o.student_boundary else None, o.student_chunk,
            recompute=not keeps_exponentials(self.student_hidden.shape[:2].numel(),
                                             len(o.student_words)),
        )

    @cached_property
    def teacher(self) -> tuple[Tensor, Tensor]:
        """The teacher's token log-probs and word-boundary log-probs, [B, T_t] each: from the
        teacher cache when the batch carries them, else from the live teacher."""
        if "teacher_logprobs" in self.batch:
            return self.batch["teacher_logprobs"], self.batch["teacher_boundary"]
        if self.teacher_hidden is None:
            raise CtdError("the objective needs the teacher's log-probs, but the batch has no "
                           "teacher cache columns and no live teacher ran")
        o = self.objective
        with torch.inference_mode():
            lp, bnd = token_logprobs(self.teacher_hidden, self.teacher_head,
                                     self.batch["teacher_input_ids"], o.teacher_words,
                                     o.teacher_chunk)
        return lp.clone(), bnd.clone()

    def live_teacher(self) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        if self.teacher_hidden is None or self.teacher_head is None:
            raise CtdError("this loss needs the live teacher's hidden states and head")
        return self.teacher_hidden, self.teacher_head


def _alm(x: Inputs, s: LossSpec) -> Tensor:
    t_lp, t_bnd = x.teacher
    s_lp, s_bnd = x.student
    b = x.batch
    return alm_loss(t_lp, s_lp, b["teacher_chunk_ids"], b["student_chunk_ids"], s.distance, s.tau,
                    t_bnd, s_bnd, s.gamma if s.merge_by_space_prob else None, s.append_space)


def _clm(x: Inputs, s: LossSpec) -> Tensor:
    return clm_loss(x.student[0], x.batch["student_loss_mask"])


def _alm_hidden(x: Inputs, s: LossSpec) -> Tensor:
    th, _ = x.live_teacher()
    b = x.batch
    return alm_hidden_loss(th, x.student_hidden, b["teacher_chunk_ids"], b["student_chunk_ids"])


def _uld(chunked: bool) -> Callable[[Inputs, LossSpec], Tensor]:
    def run(x: Inputs, s: LossSpec) -> Tensor:
        th, t_head = x.live_teacher()
        b = x.batch
        return uld_loss(th, x.student_hidden, t_head, x.student_head, b["teacher_chunk_ids"],
                        b["student_chunk_ids"], b["student_loss_mask"], chunked=chunked,
                        chunk=x.objective.teacher_chunk)
    return run


def _kd_shared(x: Inputs, s: LossSpec) -> Tensor:
    th, t_head = x.live_teacher()
    b = x.batch
    return kd_shared_loss(th, x.student_hidden, t_head, x.student_head, b["teacher_chunk_ids"],
                          b["student_chunk_ids"], x.objective.maps[s.mapping],
                          x.objective.student_chunk)


@dataclass(frozen=True)
class Loss:
    """A registered loss: its function (a sum over the batch), what it is divided by, what of
    the teacher it needs, and the LossSpec options it reads."""

    name: str
    fn: Callable[[Inputs, LossSpec], Tensor]
    per: Literal["chunks", "tokens"]
    teacher: TeacherNeed
    about: str
    options: tuple[str, ...] = ()


LOSSES: dict[str, Loss] = {loss.name: loss for loss in [
    Loss("alm", _alm, "chunks", "logprobs",
         "Approximate Likelihood Matching: chunk log-likelihoods of the student vs the teacher",
         ("distance", "tau", "merge_by_space_prob", "gamma", "append_space")),
    Loss("clm", _clm, "tokens", "none", "next-token cross-entropy on the student's tokens"),
    Loss("alm_hidden", _alm_hidden, "chunks", "hidden",
         "last hidden states at chunk ends (self-distillation: same hidden size)"),
    Loss("uld", _uld(False), "tokens", "hidden",
         "Universal Logit Distillation: sorted probabilities, k-th token with k-th"),
    Loss("uld_chunked", _uld(True), "chunks", "hidden",
         "ULD on the distributions predicting each aligned chunk's first token"),
    Loss("kd_shared", _kd_shared, "chunks", "hidden",
         "KL over a teacher->student token mapping on 1:1 chunks", ("mapping",)),
]}


def teacher_need(specs: Sequence[LossSpec]) -> TeacherNeed:
    """The most an objective needs of the teacher."""
    return max((LOSSES[s.name].teacher for s in specs), key=_NEED_ORDER.index, default="none")


def _keys(specs: list[LossSpec]) -> list[str]:
    names = [s.name for s in specs]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


class DistillObjective:
    """The training objective: a weighted sum of registered losses on one aligned batch."""

    def __init__(self, specs: list[LossSpec], teacher_tokenizer, student_tokenizer,
                 balance: Balance = "fixed"):
        if not specs:
            raise CtdError(f"no losses given; choose from {', '.join(LOSSES)}")
        if balance not in Balance.__args__:
            raise CtdError(f"unknown balance '{balance}'; valid: {', '.join(Balance.__args__)}")
        self.specs = list(specs)
        self.keys = _keys(self.specs)
        self.balance = balance
        self.teacher_need = teacher_need(self.specs)
        alms = [s for s in self.specs if s.name == "alm"]
        self.teacher_words = word_start_mask(teacher_tokenizer)
        self.student_words = word_start_mask(student_tokenizer)
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
        balance_params: Sequence[Tensor] = (),
    ) -> dict[str, Tensor]:
        """{"loss": the weighted sum, and each term's (detached) value}. `balance_params` are
        the parameters whose gradient norms `grad_norm` balances (the last layer's)."""
        x = Inputs(self, batch, student_hidden, student_head, teacher_hidden, teacher_head)
        norms = {"chunks": max(int(global_chunks), 1), "tokens": max(int(global_tokens), 1)}
        values = [LOSSES[s.name].fn(x, s) / norms[LOSSES[s.name].per] for s in self.specs]
        weights = [s.weight * w for s, w in zip(self.specs, self._balance(
            values, student_hidden, balance_params), strict=True)]
        total = sum(w * v for w, v in zip(weights, values, strict=True))
        if self.balance == "grad_norm" and len(values) > 1:
            total = total / sum(weights)
        out = {"loss": total}
        out.update({k: v.detach() for k, v in zip(self.keys, values, strict=True)})
        return out

    def _balance(self, values: list[Tensor], student_hidden: Tensor,
                 params: Sequence[Tensor]) -> list[float]:
        """1 each (fixed), or 1 / the norm of each term's gradient (no gradient through the
        weight) w.r.t. the last layer's parameters (grad_norm) or the last hidden state
        (grad_norm_hidden)."""
        if self.balance == "fixed" or len(values) < 2 or not student_hidden.requires_grad:
            return [1.0] * len(values)
        wrt = [student_hidden] if self.balance == "grad_norm_hidden" else list(params)
        if not wrt:
            raise CtdError("balance grad_norm needs the student's last-layer parameters")
        weights = []
        for v in values:
            grads = [g.flatten() for g in torch.autograd.grad(v, wrt, retain_graph=True,
                                                              allow_unused=True) if g is not None]
            norm = float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0
            weights.append(1.0 / norm if norm > 0 else 1.0)
        return weights
