"""What defines an FFBA adapter besides its weights; saved next to them as JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rankwise.ffba.layers import ACTIVATIONS
from rankwise.options import check_low_rank

BLOCKS = ("attn", "mlp")  # sub-blocks an adapter can sit beside
FORMAT_VERSION = 1


@dataclass
class Settings:
    rank: int
    alpha: float
    blocks: tuple[str, ...] = BLOCKS
    activation: str = "identity"
    dropout: float = 0.0

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
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"format": "rankwise-ffba", "version": FORMAT_VERSION, **dataclasses.asdict(self),
                "blocks": list(self.blocks)}

    @classmethod
    def from_json(cls, d: dict) -> "Settings":
        if d.get("format") != "rankwise-ffba" or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not an FFBA adapter config (format {d.get('format')!r}, version {d.get('version')!r})")
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), blocks=tuple(d["blocks"]),
                   activation=d["activation"], dropout=float(d.get("dropout", 0.0))).check()
