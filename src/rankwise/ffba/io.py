"""The FFBA artifact: ffba_config.json (Settings + base architecture) and ffba_adapter.safetensors.

Tensor names: forward adapters '<layer>.<block>.A' (r×d) and '.B' (d×r), e.g. 'layers.0.attn.A';
backward adapters '<layer>.<block>.back.A' (r × d_in of o_proj/down_proj, or × d with reads=normed) and '.back.B' (d_out of the next
sub-block's input projections, stacked q,k,v or gate,up × r), named by the sub-block they follow.
The scale s = alpha / rank is not folded into B, so the file is the trained parameters as they are.
Version 1 configs (forward adapters only, no `adapters` key) load as adapters=forward, version 2 (no `reads`)
as reads=hidden.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from rankwise.ffba.inject import adapters, inject, junctions
from rankwise.ffba.settings import Settings

CONFIG = "ffba_config.json"
WEIGHTS = "ffba_adapter.safetensors"


def tensors_of(model: nn.Module) -> dict:
    """{artifact name: tensor} for every adapter of an unfused model."""
    tensors = {}
    for name, adapter in adapters(model).items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = adapter.A.detach(), adapter.B.detach()
    for name, junction in junctions(model).items():
        tensors[f"{name}.back.A"], tensors[f"{name}.back.B"] = junction.A.detach(), junction.B
    return tensors


def save(model: nn.Module, settings: Settings, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().cpu() for k, v in tensors_of(model).items()}
    if not tensors:
        raise ValueError("ffba: this model has no unfused FFBA adapters to save")
    config = {**settings.to_json(), "model_type": model.config.model_type,
              "hidden_size": model.config.hidden_size, "num_layers": len(model.get_decoder().layers)}
    save_file(tensors, str(Path(path) / WEIGHTS), metadata={"format": "rankwise-ffba"})
    (Path(path) / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_settings(path: Path) -> tuple[Settings, dict]:
    file = Path(path) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no FFBA adapter ({CONFIG} missing)")
    raw = json.loads(file.read_text())
    return Settings.from_json(raw), raw


def load(base: nn.Module, path: Path) -> tuple[nn.Module, Settings]:
    """Put the saved adapters into `base` (unfused, frozen base)."""
    from safetensors.torch import load_file

    settings, raw = read_settings(path)
    if raw["hidden_size"] != base.config.hidden_size or raw["num_layers"] != len(base.get_decoder().layers):
        raise ValueError(f"{path}: adapter was trained for hidden_size {raw['hidden_size']} x {raw['num_layers']} "
                         f"layers, base model has {base.config.hidden_size} x {len(base.get_decoder().layers)}")
    model = inject(base, settings)
    saved = load_file(str(Path(path) / WEIGHTS))
    expected = tensors_of(model)
    if set(saved) != set(expected) or any(saved[k].shape != v.shape for k, v in expected.items()):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        wrong = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
        raise ValueError(f"{path}: adapter tensors do not match (missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong shape {wrong[:3]})")
    for name, adapter in adapters(model).items():
        adapter.A.data.copy_(saved[f"{name}.A"])
        adapter.B.data.copy_(saved[f"{name}.B"])
    for name, junction in junctions(model).items():
        junction.A.data.copy_(saved[f"{name}.back.A"])
        junction.set_B(saved[f"{name}.back.B"])
    return model, settings
