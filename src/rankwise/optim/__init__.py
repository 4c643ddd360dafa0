"""Optimizers by name. Each entry builds a torch.optim.Optimizer for a prepared model.

Method-specific optimizers (LoFT, LoRA-Pre, …) live in their own modules here, are importable as
`rankwise.optim.<Name>`, and register a factory so `optimizer=<name>` works in the recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rankwise.config import Config, ConfigError


@dataclass
class OptimizerEntry:
    build: Callable[[torch.nn.Module, Config], torch.optim.Optimizer]
    check: Callable[[Config], None] = lambda cfg: None


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(name: str, build, check=None) -> None:
    OPTIMIZERS[name] = OptimizerEntry(build, check or (lambda cfg: None))


def get_optimizer(name: str) -> OptimizerEntry:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


def closure_loss(closure):
    """torch.optim's closure contract: re-evaluate the loss with gradients enabled, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model, cfg: Config) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    # fused: one kernel for the whole update on CUDA (foreach reads each step counter on the host); on
    # the CPU foreach keeps the arithmetic every earlier run and test was made with
    fused = bool(params) and all(p.is_cuda and type(p.data) is torch.Tensor for p in params)  # not FSDP's DTensors
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             foreach=not fused, fused=fused or None)


def _check_adamw(cfg: Config) -> None:
    if cfg.optimizer_args:
        raise ConfigError(f"optimizer 'adamw' takes no optimizer_args, got {sorted(cfg.optimizer_args)}")


register("adamw", _adamw, _check_adamw)

from rankwise.plugins import discover  # noqa: E402

discover(__name__, __path__, globals())
