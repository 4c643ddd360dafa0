"""Adapter methods: how a base model becomes a trainable model, and how the trained part is saved.

A method is looked up by name in METHODS. A new method is a new module in this package that calls
`register`; it is found automatically. The training loop never names a method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rankwise.config import Config, ConfigError
from rankwise.options import NoOptions, check_low_rank, parse


@dataclass(frozen=True)
class MethodSpec:
    """What a method builds from: the adapter's shape and its own typed options (method_args)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    options: object = field(default_factory=NoOptions)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Method:
    """Interface every method implements. `path` is a directory the method owns.

    What a method can do is declared here, by the method, and asked by whoever needs it:
    `update` names the form of the trained weights (optimizers that need a form, e.g. LoFT's
    W0 + s·B·A, ask for it), `fsdp` says it trains under parallel=fsdp (tested there).
    """

    name: str = ""
    mergeable: bool = False  # can `merge` fold the adapter into the base weights?
    Options: type = NoOptions  # method_args as a frozen dataclass, checked in its __post_init__
    update: str = "adapter"  # "lora": W = W0 + s·B·A with PEFT LoRA factors; "full": every weight; ...
    fsdp: bool = False  # trains under parallel=fsdp (FSDP2's DTensor parameters)
    low_rank: bool = True  # reads rank / alpha / dropout (checked once, in spec)

    def spec(self, cfg: Config) -> MethodSpec:
        """The run config's method part, parsed and checked (ConfigError, no weights loaded)."""
        options = parse(self.Options, cfg.method_args, f"method {self.name!r} does not take method_args")
        spec = MethodSpec(cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules, options)
        try:
            if self.low_rank:
                check_low_rank(spec.rank, spec.alpha, spec.dropout)
            self.check(spec, cfg)
        except ValueError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        return spec

    def check(self, spec: MethodSpec, cfg: Config) -> None:
        """Checks across fields or against the run (e.g. the model's architecture); raise ValueError."""

    def apply(self, model, spec: MethodSpec | Config):
        """Return the model to train, with exactly the trainable tensors requiring grad. A run Config is
        parsed here (for scripts that skip validate)."""
        return self.adapt(model, self.spec(spec) if isinstance(spec, Config) else spec)

    def adapt(self, model, spec: MethodSpec):
        raise NotImplementedError

    def save(self, model, path: Path) -> None:
        """Write the trained part to `path` (which exists and is empty)."""
        raise NotImplementedError

    def load(self, base, path: Path, trainable: bool = False):
        """Rebuild the trained model from a base model and what `save` wrote."""
        raise NotImplementedError

    def merge(self, model):
        """Return a plain transformers model with the adapter folded in."""
        raise ConfigError(f"method {self.name!r} cannot be merged into the base weights")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from rankwise.plugins import discover  # noqa: E402

discover(__name__, __path__, globals())
