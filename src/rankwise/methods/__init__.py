"""Adapter methods: how a base model becomes a trainable model, and how the trained part is saved.

A method is looked up by name in METHODS. A new method is a new module in this package that calls
`register`; it is found automatically. The training loop never names a method.
"""
from __future__ import annotations

from pathlib import Path

from rankwise.config import Config, ConfigError


class Method:
    """Interface every method implements. `path` is a directory the method owns."""

    name: str = ""
    mergeable: bool = False  # can `merge` fold the adapter into the base weights?

    def check(self, cfg: Config) -> None:
        """Raise ConfigError if `cfg` cannot work with this method (no weights are loaded)."""

    def apply(self, model, cfg: Config):
        """Return the model to train, with exactly the trainable tensors requiring grad."""
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


def check_low_rank(cfg, who: str = "") -> None:
    """The checks every rank/alpha/dropout adapter shares (`cfg`: a Config or any object with those fields;
    `who` prefixes the message, e.g. "ffba: ")."""
    if cfg.rank <= 0:
        raise ConfigError(f"{who}rank must be a positive integer, got {cfg.rank}")
    if cfg.alpha <= 0:
        raise ConfigError(f"{who}alpha must be positive, got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"{who}dropout must be in [0, 1), got {cfg.dropout}")


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
