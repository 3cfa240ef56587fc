"""Plain next-token cross-entropy on the student's own tokens (no teacher)."""

from __future__ import annotations

from torch import Tensor


def clm_loss(student_lp: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of -log p_S(y_j | y_<j) over scored tokens; the caller divides by the global count."""
    return -(student_lp * loss_mask).sum()
