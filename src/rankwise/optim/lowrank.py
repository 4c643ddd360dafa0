"""What the low-rank-state optimizers share (LoRA-Pre, GaLore, the pre-training recipe, the benches):
which weights get rank-r state, and how many bytes an optimizer's state holds."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
from torch import nn

__all__ = ["low_rank_groups", "optimizer_state_bytes"]


def without_8bit(package: str, name: str, module: str, attr: str, missing: str):
    """`package.name`, or, when the package's __init__ fails on its 8-bit variants (they import bitsandbytes),
    `package.module.attr` loaded from the same installed package with that __init__ skipped. ImportError
    with `missing` when the package is not installed. (galore-torch and apollo-torch are laid out alike.)"""
    try:
        return getattr(importlib.import_module(package), name)
    except ImportError:
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise ImportError(missing) from None
        shell = types.ModuleType(package)
        shell.__path__, shell.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[package] = shell
        return getattr(importlib.import_module(f"{package}.{module}"), attr)


def low_rank_groups(model: nn.Module, rank: int, targets=None, rest: str = "adamw") -> list[dict]:
    """Split a model's trainable parameters into a low-rank group and a plain AdamW group.

    targets=None picks every nn.Linear weight inside the decoder blocks (attention and MLP projections),
    never the input embedding or the output head (tied or not). A list of name fragments (e.g.
    ["q_proj", "v_proj"]) or the string "all-linear" overrides the choice. rest="frozen" instead sets
    requires_grad=False on every other parameter (fine-tuning with no full-size optimizer state at all).
    """
    if rest not in ("adamw", "frozen"):
        raise ValueError(f"rest must be 'adamw' or 'frozen', got {rest!r}")
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t for t in targets.split(",") if t]
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            skip.add(id(module.weight))
    chosen = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None or not weight.requires_grad or id(weight) in skip:
            continue
        if targets in (None, "all-linear") or any(t in name for t in targets):
            chosen.append(weight)
    if not chosen:
        raise ValueError(f"no Linear weight matched targets={targets!r} for low-rank optimizer state")
    picked = {id(w) for w in chosen}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in picked]
    if rest == "frozen":
        for p in others:
            p.requires_grad_(False)
        others = []
    return [{"params": chosen, "rank": rank}, {"params": others, "rank": 0}]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params=None) -> int:
    """Bytes held in an optimizer's per-parameter state tensors (also tensors on state objects, e.g.
    GaLore's projector matrix), for all parameters or only `params`; transient step buffers not included."""
    seen, total = set(), 0

    def count(value, depth=0):
        nonlocal total
        if torch.is_tensor(value):
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                count(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                count(v, depth + 1)
        elif depth < 3 and hasattr(value, "__dict__"):
            count(vars(value), depth + 1)

    chosen = None if params is None else {id(p) for p in params}
    for p, state in optimizer.state.items():
        if chosen is None or id(p) in chosen:
            count(state)
    return total
