"""Step hooks: code that runs around optimizer steps without the loop knowing what it is.

Fast Forward is the first user. A hook factory is registered under a name; `build_hooks` asks every
factory whether it is enabled for this config (it returns None when not).
"""
from __future__ import annotations

from typing import Callable, Protocol

from rankwise.config import Config, ConfigError


class RunContext(Protocol):
    """What the loop exposes to hooks (see rankwise.recipes.train.Run)."""

    cfg: Config
    model: object
    scorer: object  # what to call for losses: token_loss_sum(scorer, batch) (goes through FSDP's hooks)
    optimizer: object
    step: int  # optimizer steps taken so far
    world: object  # rankwise.train.dist.World: rank and size under torchrun

    def trainable(self) -> list: ...
    def tiny_loss(self) -> float: ...  # mean loss on the tiny held-out set, eval mode, no grad
    def log(self, record: dict) -> None: ...
    def add_cost(self, flops: float, seconds: float) -> None: ...  # charge extra work to the run


class StepHook:
    """Base class: override what you need. State must round-trip through state_dict for exact resume."""

    name = ""

    def on_train_start(self, run: RunContext) -> None:
        pass

    def after_step(self, run: RunContext) -> None:
        """Called after every optimizer step (and scheduler step)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


HookFactory = Callable[[Config], "StepHook | None"]
HOOKS: dict[str, tuple[HookFactory, Callable[[Config], None]]] = {}


def register(name: str, factory: HookFactory, check: Callable[[Config], None] | None = None) -> None:
    HOOKS[name] = (factory, check or (lambda cfg: None))


def check_hooks(cfg: Config) -> None:
    for name in cfg.hooks:
        if name not in HOOKS:
            raise ConfigError(f"unknown hook {name!r}; choose from: {', '.join(sorted(HOOKS)) or 'none registered'}")
    for _, check in HOOKS.values():
        check(cfg)


def build_hooks(cfg: Config) -> list[StepHook]:
    hooks = []
    for name, (factory, _) in HOOKS.items():
        hook = factory(cfg)
        if hook is not None:
            hooks.append(hook)
    return hooks


from rankwise.plugins import discover  # noqa: E402

discover(__name__, __path__, globals())
