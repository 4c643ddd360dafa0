"""Step hooks: code that runs around optimizer steps without the loop knowing what it is.

Fast Forward is the first user. A hook registers a factory, its typed options and its switch;
`check_hooks` parses every hook's options once and picks the enabled ones, `build_hooks` builds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from rankwise.config import Config, ConfigError
from rankwise.options import NoOptions, parse


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


@dataclass(frozen=True)
class HookEntry:
    """A registered hook: how to build it from its typed options, and how a run turns it on."""

    name: str
    factory: Callable[[object], StepHook]  # options -> hook
    Options: type = NoOptions
    options_key: str = ""  # the Config mapping that holds its options (e.g. "ff"); "" for none
    switch: str = ""  # a Config bool that turns it on (e.g. "fast_forward"); "" means: listed in `hooks`

    def options(self, cfg: Config):
        values = getattr(cfg, self.options_key) if self.options_key else {}
        return parse(self.Options, values, f"unknown {self.name} option(s)" if self.options_key else
                     f"hook {self.name!r} takes no options, got")

    def enabled(self, cfg: Config) -> bool:
        return bool(getattr(cfg, self.switch)) if self.switch else self.name in cfg.hooks


HOOKS: dict[str, HookEntry] = {}


def register(name: str, factory, Options: type = NoOptions, options_key: str = "", switch: str = "") -> HookEntry:
    HOOKS[name] = entry = HookEntry(name, factory, Options, options_key, switch)
    return entry


def check_hooks(cfg: Config) -> list[tuple[HookEntry, object]]:
    """Every registered hook's options parsed and checked (on or off: a typo is caught either way); returns
    the enabled hooks with their options, for build_hooks."""
    for name in cfg.hooks:
        if name not in HOOKS:
            raise ConfigError(f"unknown hook {name!r}; choose from: {', '.join(sorted(HOOKS)) or 'none registered'}")
        if HOOKS[name].switch:  # one switch per hook
            raise ConfigError(f"hook {name!r} is turned on with {HOOKS[name].switch}=true, not hooks=[{name}]")
    chosen = [(entry, entry.options(cfg)) for entry in HOOKS.values()]
    return [(entry, options) for entry, options in chosen if entry.enabled(cfg)]


def build_hooks(chosen: list[tuple[HookEntry, object]]) -> list[StepHook]:
    """The hooks check_hooks chose, built from their options."""
    return [entry.factory(options) for entry, options in chosen]


from rankwise.plugins import discover  # noqa: E402

discover(__name__, __path__, globals())
