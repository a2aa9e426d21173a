"""Learning-rate schedule, per optimisation step: linear warm-up, then cosine decay to a floor.

For step ``t`` (0-based) of ``total`` steps with ``warmup`` warm-up steps and peak ``lr``::

    t <  warmup:  lr · (t + 1) / warmup
    t >= warmup:  min_lr + (lr − min_lr) · ½ · (1 + cos(π · (t − warmup) / max(1, total − warmup)))

so the first step already trains (at ``lr / warmup``), the peak is reached at the end of the warm-up and
the last step runs just above ``min_lr``. Each parameter group keeps its own peak (``initial_lr``) and is
scaled by the same factor; ``min_lr`` is scaled likewise.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

from torch.optim import Optimizer


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """The learning rate at 0-based ``step`` (see the module docstring)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each group's ``lr`` for the coming step; ``step()`` once per optimisation step, before
    ``optimizer.step()``. The position is in ``state_dict()`` so a resumed run continues it exactly."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"the schedule needs at least one step, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warm-up steps must be in [0, {total_steps}], got {warmup_steps}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs: List[float] = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.peak = max(self.base_lrs) if self.base_lrs else 0.0
        self.position = 0  # steps taken so far

    def lr_at(self, step: int) -> List[float]:
        """Every group's learning rate at 0-based ``step``."""
        rates = []
        for base in self.base_lrs:
            floor = self.min_lr * base / self.peak if self.peak > 0 else 0.0
            rates.append(warmup_cosine(step, self.total_steps, self.warmup_steps, base, floor))
        return rates

    def step(self) -> List[float]:
        """Set the learning rates for the next optimisation step and advance; returns them."""
        rates = self.lr_at(self.position)
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self.position += 1
        return rates

    @property
    def last_lr(self) -> float:
        """The (first group's) learning rate of the last step taken (the first step's before any)."""
        return self.lr_at(max(0, self.position - 1))[0]

    def state_dict(self) -> Dict[str, Any]:
        return {"position": self.position, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr": self.min_lr, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue at the saved position (the totals are those this schedule was built with)."""
        self.position = int(state["position"])
