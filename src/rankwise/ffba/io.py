"""The FFBA artifact: ffba_config.json (Settings + base architecture) and ffba_adapter.safetensors.

Tensor names are '<layer>.<block>.A' (r×d) and '<layer>.<block>.B' (d×r), e.g. 'layers.0.attn.A';
the scale s = alpha / rank is not folded into B, so the file is the trained parameters as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from rankwise.ffba.inject import adapters, inject
from rankwise.ffba.settings import Settings

CONFIG = "ffba_config.json"
WEIGHTS = "ffba_adapter.safetensors"


def save(model: nn.Module, settings: Settings, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, adapter in adapters(model).items():
        tensors[f"{name}.A"] = adapter.A.detach().contiguous().cpu()
        tensors[f"{name}.B"] = adapter.B.detach().contiguous().cpu()
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
    """Put the saved adapters beside `base`'s sub-blocks (unfused, frozen base)."""
    from safetensors.torch import load_file

    settings, raw = read_settings(path)
    if raw["hidden_size"] != base.config.hidden_size or raw["num_layers"] != len(base.get_decoder().layers):
        raise ValueError(f"{path}: adapter was trained for hidden_size {raw['hidden_size']} x {raw['num_layers']} "
                         f"layers, base model has {base.config.hidden_size} x {len(base.get_decoder().layers)}")
    model = inject(base, settings)
    tensors = load_file(str(Path(path) / WEIGHTS))
    found = adapters(model)
    expected = {f"{n}.{p}" for n in found for p in ("A", "B")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{path}: adapter tensors do not match (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, adapter in found.items():
        adapter.A.data.copy_(tensors[f"{name}.A"])
        adapter.B.data.copy_(tensors[f"{name}.B"])
    return model, settings
