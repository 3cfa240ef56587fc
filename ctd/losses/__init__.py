"""Distillation losses: ALM and its baselines (CLM, ULD, shared-vocabulary KD), one registry."""

from ctd.losses.logprobs import hidden_states, output_head
from ctd.losses.objective import LOSSES, DistillObjective, LossSpec

__all__ = ["LOSSES", "DistillObjective", "LossSpec", "hidden_states", "output_head"]
