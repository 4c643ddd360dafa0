"""Typed options: each method, optimizer and hook declares its own as a frozen dataclass.

A mapping from the run config (`method_args`, `optimizer_args`, `ff`) is turned into that dataclass
once, by `parse`, and checked there (the dataclass's `__post_init__`, with the rules below); from then
on the object travels, never the mapping. Checks raise ValueError; `parse` makes it a ConfigError, the
one-line message the CLI prints. FFOptions (rankwise.fastforward.core) is the model for the rest.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from rankwise.config import ConfigError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For an owner that takes no options: any key is refused."""


def parse(cls, values: dict | None, where: str):
    """`cls(**values)`, or ConfigError naming the unknown keys (with `where`, e.g. "optimizer 'loft'
    does not take optimizer_args") or the first value a check refused."""
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        takes = f"; valid: {', '.join(names)}" if names else "; it takes none"
        raise ConfigError(f"{where} {unknown}{takes}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


# ---- rules a __post_init__ applies: predicate(value) -> bool, and what it wants in words --------------
Rule = tuple[Callable[[object], bool], str]


def is_number(v) -> bool:
    """A finite float, or an int that fits one (bool excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
POSITIVE: Rule = (lambda v: is_number(v) and v > 0, "a number > 0")
NON_NEGATIVE: Rule = (lambda v: is_number(v) and v >= 0, "a number >= 0")
FINITE_NON_NEGATIVE: Rule = (lambda v: is_number(v) and v >= 0, "a finite number >= 0")
POSITIVE_INT: Rule = (lambda v: is_int(v) and v >= 1, "an integer >= 1")


def one_of(*choices) -> Rule:
    return (lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def check(options, prefix: str, rules: dict[str, Rule]) -> None:
    """Apply `rules` to the fields of `options` that are set (None means "the owner's default")."""
    for name, (ok, what) in rules.items():
        value = getattr(options, name)
        if value is not None and not ok(value):
            raise ValueError(f"{prefix}{name} must be {what}, got {value!r}")


def set_fields(options, skip: tuple[str, ...] = ()) -> dict:
    """The fields a user set (not None), as keyword arguments for the owner's constructor."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) is not None and f.name not in skip}


def check_low_rank(rank, alpha, dropout, who: str = "") -> None:
    """The checks every rank/alpha/dropout adapter shares; `who` prefixes the message, e.g. "ffba: "."""
    if not is_int(rank) or rank <= 0:
        raise ValueError(f"{who}rank must be a positive integer, got {rank}")
    if alpha <= 0:
        raise ValueError(f"{who}alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{who}dropout must be in [0, 1), got {dropout}")
