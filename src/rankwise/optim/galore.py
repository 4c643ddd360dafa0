"""GaLore (arXiv 2403.03507) as published in the `galore-torch` package: only registration lives here.

optimizer=galore trains full weights (method=full): the decoder blocks' Linear weights get GaLore's
projected Adam (rank r, projector refreshed every `update_proj_gap` steps, update `scale`), the rest
plain Adam inside the same GaLoreAdamW, exactly as the package's README sets it up.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from rankwise.optim import OptimizerSpec, register
from rankwise.optim.lora_pre import FULL_WEIGHTS
from rankwise.optim.lowrank import low_rank_groups, without_8bit
from rankwise.options import POSITIVE, POSITIVE_INT, check, one_of

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")  # galore_torch's GaLoreProjector


@functools.cache
def galore_adamw_class():
    """galore_torch.GaLoreAdamW. The package's __init__ also imports its 8-bit variant, which needs
    bitsandbytes; without bitsandbytes we load the plain AdamW module of the same installed package."""
    return without_8bit("galore_torch", "GaLoreAdamW", "adamw", "AdamW",
                        "optimizer 'galore' needs the galore-torch package: pip install --no-deps galore-torch")


@dataclass(frozen=True)
class GaLoreOptions:
    """optimizer_args of optimizer=galore (defaults: the galore-torch README's)."""

    rank: int | None = None  # projection rank (default: the run's rank)
    targets: str | list[str] | None = None  # see rankwise.optim.low_rank_groups
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"

    def __post_init__(self):
        check(self, "optimizer_args.", {"rank": POSITIVE_INT, "update_proj_gap": POSITIVE_INT, "scale": POSITIVE,
                                        "proj_type": one_of(*PROJ_TYPES)})
        if importlib.util.find_spec("galore_torch") is None:
            raise ValueError("optimizer 'galore' needs the galore-torch package: pip install --no-deps galore-torch")


def _build(model, spec: OptimizerSpec):
    o = spec.options
    low, rest = low_rank_groups(model, o.rank or spec.rank, o.targets)
    low.update(update_proj_gap=o.update_proj_gap, scale=float(o.scale), proj_type=o.proj_type)
    del rest["rank"]  # GaLoreAdamW projects every group that has a "rank" key
    return galore_adamw_class()([low, rest], lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                                no_deprecation_warning=True)


register("galore", _build, GaLoreOptions, **FULL_WEIGHTS)
