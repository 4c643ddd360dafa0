"""Learning-rate schedules: linear warmup, then constant or cosine decay to zero at `steps`."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier on the base LR for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, total: int, warmup: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, kind))
