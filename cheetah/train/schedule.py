"""The learning-rate schedule every training loop of the project uses (VPG-C and the base stage's phases)."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero (LAVIS's linear_warmup_cosine_lr) or constant: the factor of the
    base learning rate at each step, for `torch.optim.lr_scheduler.LambdaLR`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
