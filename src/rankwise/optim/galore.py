"""GaLore (arXiv 2403.03507) as published in the `galore-torch` package: only registration lives here.

optimizer=galore trains full weights (method=full): the decoder blocks' Linear weights get GaLore's
projected Adam (rank r, projector refreshed every `update_proj_gap` steps, update `scale`), the rest
plain Adam inside the same GaLoreAdamW, exactly as the package's README sets it up.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

from rankwise.config import Config, ConfigError
from rankwise.optim import register
from rankwise.optim.lora_pre import check_full_rank_optimizer, lora_pre_groups

GALORE_ARGS = {"rank", "update_proj_gap", "scale", "proj_type", "targets"}
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")  # galore_torch's GaLoreProjector


@functools.cache
def galore_adamw_class():
    """galore_torch.GaLoreAdamW. The package's __init__ also imports its 8-bit variant, which needs
    bitsandbytes; without bitsandbytes we load the plain AdamW module of the same installed package."""
    try:
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW
    except ImportError:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            raise ConfigError("optimizer 'galore' needs the galore-torch package: pip install --no-deps galore-torch")
        package = types.ModuleType("galore_torch")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["galore_torch"] = package
        return importlib.import_module("galore_torch.adamw").AdamW


def _check(cfg: Config) -> None:
    check_full_rank_optimizer(cfg, "galore", GALORE_ARGS)
    args = cfg.optimizer_args
    gap = args.get("update_proj_gap", 200)
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise ConfigError(f"optimizer_args.update_proj_gap must be an integer >= 1, got {gap!r}")
    if args.get("proj_type", "std") not in PROJ_TYPES:
        raise ConfigError(f"optimizer_args.proj_type must be one of {', '.join(PROJ_TYPES)}, got {args['proj_type']!r}")
    if importlib.util.find_spec("galore_torch") is None:
        raise ConfigError("optimizer 'galore' needs the galore-torch package: pip install --no-deps galore-torch")


def _build(model, cfg: Config):
    args = cfg.optimizer_args
    low, rest = lora_pre_groups(model, args.get("rank", cfg.rank), args.get("targets"))
    low.update(update_proj_gap=int(args.get("update_proj_gap", 200)), scale=float(args.get("scale", 0.25)),
               proj_type=args.get("proj_type", "std"))
    del rest["rank"]  # GaLoreAdamW projects every group that has a "rank" key
    return galore_adamw_class()([low, rest], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                no_deprecation_warning=True)


register("galore", _build, _check)
