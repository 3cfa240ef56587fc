"""Distillation losses: ALM and its baselines (CLM, ULD, shared-vocabulary KD)."""

from ctd.losses.combine import LOSSES, DistillObjective, LossSpec
from ctd.losses.logprobs import hidden_states, output_head

__all__ = ["LOSSES", "DistillObjective", "LossSpec", "hidden_states", "output_head"]
