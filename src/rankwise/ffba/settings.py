"""What defines an FFBA adapter besides its weights; saved next to them as JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rankwise.ffba.layers import ACTIVATIONS
from rankwise.options import check_low_rank, is_number

BLOCKS = ("attn", "mlp")  # sub-blocks an adapter can sit beside (forward) or after (backward)
VARIANTS = ("forward", "backward", "both")  # which adapters: see layers.py
READS = ("hidden", "normed")  # what a backward adapter's down-projection reads: see layers.py
FORMAT_VERSION = 3  # 3 records `reads`, 2 `adapters` and `split`; versions 1 (forward only) and 2 still load
DEFAULT_SPLIT = 0.5


@dataclass
class Settings:
    """`rank` is the total rank: with adapters=both, round(split·rank) goes to the backward adapters and the
    rest to the forward ones. Every adapter uses the same scale s = alpha / rank."""

    rank: int
    alpha: float
    blocks: tuple[str, ...] = BLOCKS
    activation: str = "identity"
    dropout: float = 0.0
    adapters: str = "forward"
    split: float | None = None  # fraction of the rank for the backward adapters (adapters=both only)
    reads: str = "hidden"  # the backward adapters' input: the output projection's (hidden) or the normed x

    def check(self) -> "Settings":
        """Raise ValueError with a one-line reason unless these settings can build an adapter."""
        check_low_rank(self.rank, self.alpha, self.dropout, who="ffba: ")
        unknown = [b for b in self.blocks if b not in BLOCKS]
        if unknown or not self.blocks:
            raise ValueError(f"ffba: method_args.blocks must be a non-empty subset of {list(BLOCKS)}, "
                              f"got {list(self.blocks)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ffba: unknown method_args.activation {self.activation!r}; choose one of: "
                              f"{', '.join(ACTIVATIONS)}")
        if self.adapters not in VARIANTS:
            raise ValueError(f"ffba: method_args.adapters must be one of {', '.join(VARIANTS)}, got {self.adapters!r}")
        if self.reads not in READS:
            raise ValueError(f"ffba: method_args.reads must be one of {', '.join(READS)}, got {self.reads!r}")
        if self.reads != "hidden" and self.adapters == "forward":
            raise ValueError(f"ffba: method_args.reads={self.reads} applies to backward adapters; "
                             "choose adapters=backward or both")
        if self.split is not None:
            if self.adapters != "both":
                raise ValueError(f"ffba: method_args.split only applies to adapters=both (got adapters={self.adapters})")
            if not is_number(self.split) or not 0 < self.split < 1:
                raise ValueError(f"ffba: method_args.split must be a number in (0, 1), got {self.split!r}")
        if self.adapters == "both" and not (self.forward_rank >= 1 and self.backward_rank >= 1):
            raise ValueError(f"ffba: rank {self.rank} split {self.used_split:g} leaves the forward adapters rank "
                             f"{self.forward_rank} and the backward ones rank {self.backward_rank}; both need >= 1")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def used_split(self) -> float | None:
        if self.adapters != "both":
            return None
        return DEFAULT_SPLIT if self.split is None else float(self.split)

    @property
    def backward_rank(self) -> int:
        if self.adapters == "both":
            return int(self.used_split * self.rank + 0.5)  # half up, not Python's half-to-even
        return self.rank if self.adapters == "backward" else 0

    @property
    def forward_rank(self) -> int:
        return self.rank - self.backward_rank

    def to_json(self) -> dict:
        return {"format": "rankwise-ffba", "version": FORMAT_VERSION, **dataclasses.asdict(self),
                "blocks": list(self.blocks), "split": self.used_split,
                "forward_rank": self.forward_rank, "backward_rank": self.backward_rank}  # the last two: for readers

    @classmethod
    def from_json(cls, d: dict) -> "Settings":
        if d.get("format") != "rankwise-ffba" or d.get("version") not in (1, 2, FORMAT_VERSION):
            raise ValueError(f"not an FFBA adapter config (format {d.get('format')!r}, version {d.get('version')!r})")
        variant = d.get("adapters", "forward") if d["version"] >= 2 else "forward"
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), blocks=tuple(d["blocks"]),
                   activation=d["activation"], dropout=float(d.get("dropout", 0.0)), adapters=variant,
                   split=d.get("split") if variant == "both" else None,
                   reads=d.get("reads", "hidden") if d["version"] >= 3 else "hidden").check()
