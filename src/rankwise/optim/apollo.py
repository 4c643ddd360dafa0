"""APOLLO (arXiv 2412.05270) as published in the `apollo-torch` package: only registration lives here.

optimizer=apollo trains full weights (method=full): the decoder blocks' Linear weights get APOLLO's
group (Adam moments of a rank-r random projection of the gradient give channel-wise scaling factors for
the raw gradient; projector redrawn every `update_proj_gap` steps, update `scale`), the rest plain Adam,
inside the same optimizer, as the package's README sets it up. APOLLO-Mini is
`optimizer_args.rank=1 optimizer_args.scale_type=tensor optimizer_args.scale=128`.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from rankwise.optim import OptimizerSpec, register
from rankwise.optim.lora_pre import FULL_WEIGHTS, _targets
from rankwise.optim.lowrank import low_rank_groups, without_8bit
from rankwise.options import POSITIVE, POSITIVE_INT, check, one_of

MISSING = "optimizer 'apollo' needs the apollo-torch package: pip install --no-deps apollo-torch"
PROJ_TYPES = ("std", "reverse_std", "right", "left")  # apollo_torch's projectors ("full" is not implemented)


@functools.cache
def apollo_adamw_class():
    """apollo_torch.apollo.AdamW. The package's __init__ also imports its 8-bit variants, which need
    bitsandbytes; without bitsandbytes we load the plain module of the same installed package."""
    return without_8bit("apollo_torch", "APOLLOAdamW", "apollo", "AdamW", MISSING)


@dataclass(frozen=True)
class ApolloOptions:
    """optimizer_args of optimizer=apollo (defaults: the apollo-torch README's for APOLLO)."""

    rank: int | None = None  # auxiliary projection rank (default: the run's rank)
    targets: str | list[str] | None = None  # see rankwise.optim.low_rank_groups
    rest: str = "adamw"  # the other trainable tensors: adamw (plain Adam in the same optimizer) | frozen
    update_proj_gap: int = 200
    scale: float = 1.0  # multiplies the scaled gradient (README: 1 for APOLLO, 128 for APOLLO-Mini)
    scale_type: str = "channel"  # channel: APOLLO; tensor: APOLLO-Mini
    proj: str = "random"  # random: APOLLO's seeded Gaussian projection; svd: GaLore's
    proj_type: str = "std"

    def __post_init__(self):
        check(self, "optimizer_args.", {
            "rank": POSITIVE_INT, "update_proj_gap": POSITIVE_INT, "scale": POSITIVE,
            "scale_type": one_of("channel", "tensor"), "proj": one_of("random", "svd"),
            "proj_type": one_of(*PROJ_TYPES), "rest": one_of("adamw", "frozen"),
            "targets": (_targets, "all-linear, comma-separated name fragments or a list of them")})
        if importlib.util.find_spec("apollo_torch") is None:
            raise ValueError(MISSING)


def _build(model, spec: OptimizerSpec):
    o = spec.options
    low, rest = low_rank_groups(model, o.rank or spec.rank, o.targets, o.rest)
    low.update(proj=o.proj, scale_type=o.scale_type, update_proj_gap=o.update_proj_gap, scale=float(o.scale),
               proj_type=o.proj_type)
    del rest["rank"]  # APOLLO projects every group that has a "rank" key
    return apollo_adamw_class()([low, rest], lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


register("apollo", _build, ApolloOptions, **FULL_WEIGHTS)
