"""Optimizers by name. Each entry builds a torch.optim.Optimizer for a prepared model.

Method-specific optimizers (LoFT, LoRA-Pre, …) live in their own modules here, are importable as
`rankwise.optim.<Name>`, and register a factory so `optimizer=<name>` works in the recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rankwise.config import Config, ConfigError
from rankwise.methods import METHODS, get_method
from rankwise.options import NoOptions, parse


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer is built from: the run's hyper-parameters and its own typed options
    (optimizer_args). `rank` is the run's adapter rank, the default for low-rank optimizer state."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    clip: float = 1.0  # the run's max gradient norm (0: none); optimizers that clip their own read it
    rank: int = 16
    options: object = field(default_factory=NoOptions)


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer and what it declares about itself (asked by validation, the loop, dist)."""

    name: str
    factory: Callable[[torch.nn.Module, OptimizerSpec], torch.optim.Optimizer]
    Options: type = NoOptions  # optimizer_args as a frozen dataclass, checked in its __post_init__
    updates: tuple[str, ...] | None = None  # the method update forms it can train (Method.update); None: any
    clips_gradients: bool = False  # clips its own (e.g. projected) gradients: the loop must not clip raw ones
    fsdp: bool = False  # steps FSDP2's sharded DTensor parameters correctly (tested there)
    uses_rank: bool = False  # keeps rank-r state: optimizer_args.rank, else the run's rank, must be >= 1
    needs: str = ""  # what `updates` asks for, in words (for the error when a method does not fit)

    def spec(self, cfg: Config) -> OptimizerSpec:
        """The run config's optimizer part, parsed and checked (ConfigError, no weights loaded)."""
        return self.make_spec(cfg.optimizer_args, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                              clip=cfg.clip, rank=cfg.rank)

    def make_spec(self, optimizer_args: dict, **hyper) -> OptimizerSpec:
        """An OptimizerSpec from optimizer_args (parsed and checked here) and OptimizerSpec's other fields."""
        options = parse(self.Options, optimizer_args, f"optimizer {self.name!r} does not take optimizer_args")
        spec = OptimizerSpec(**hyper, options=options)
        rank = getattr(options, "rank", None) or spec.rank
        if self.uses_rank and (not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"optimizer {self.name!r} needs a positive integer rank, got {rank!r}")
        return spec

    def check_update(self, update: str, method_name: str, fits: list[str]) -> None:
        """ConfigError unless this optimizer can train weights of the form `update` (a Method's)."""
        if self.updates is not None and update not in self.updates:
            raise ConfigError(f"optimizer {self.name!r} needs {self.needs or 'another method'}: use "
                              f"method={'|'.join(fits)} (got method={method_name})")

    def check(self, cfg: Config) -> OptimizerSpec:
        """`spec(cfg)`, and ConfigError unless this optimizer can train what cfg's method trains."""
        spec = self.spec(cfg)
        fits = sorted(name for name, m in METHODS.items() if self.updates is None or m.update in self.updates)
        self.check_update(get_method(cfg.method).update, cfg.method, fits)
        return spec

    def build(self, model: torch.nn.Module, spec: OptimizerSpec | Config) -> torch.optim.Optimizer:
        """Build it for `model`. A run Config is parsed here (for scripts that skip validate)."""
        return self.factory(model, self.spec(spec) if isinstance(spec, Config) else spec)


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(name: str, factory, Options: type = NoOptions, **capabilities) -> OptimizerEntry:
    """Register `factory(model, spec) -> Optimizer` under `name`, with its options class and capabilities
    (see OptimizerEntry)."""
    OPTIMIZERS[name] = entry = OptimizerEntry(name, factory, Options, **capabilities)
    return entry


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


def _adamw(model, spec: OptimizerSpec) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    # fused: one kernel for the whole update on CUDA (foreach reads each step counter on the host); on
    # the CPU foreach keeps the arithmetic every earlier run and test was made with
    fused = bool(params) and all(p.is_cuda and type(p.data) is torch.Tensor for p in params)  # not FSDP's DTensors
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                             foreach=not fused, fused=fused or None)


register("adamw", _adamw, fsdp=True)

from rankwise.plugins import discover  # noqa: E402

discover(__name__, __path__, globals())
