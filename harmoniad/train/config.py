"""Optimisation settings of HarmoniAD training: length, learning-rate schedule, precision."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``max_steps`` (when set) replaces ``epochs`` as the length."""

    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    amp: bool = True
    #: ``torch.compile`` the heads (pays off on long GPU runs; does not change the result).
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch_size and checkpoint_every must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, weight_decay and grad_clip >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_fraction must be in [0, 1) and min_lr_ratio in [0, 1]")

    def total_steps(self, num_items: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(num_items / self.batch_size)

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_fraction`` of the run, then cosine decay to ``lr * min_lr_ratio``."""
        warmup = int(round(self.warmup_fraction * total))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        low = self.lr * self.min_lr_ratio
        return low + (self.lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
