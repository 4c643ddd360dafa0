"""Model surgery on Llama-family decoder layers: wrap sub-blocks with adapters, or fuse them in.

Each decoder layer calls `self_attn(hidden_states=norm(h), ...)` and `mlp(norm(h))`, so replacing
those two modules is enough: the adapter sees the sub-block's normed input and adds to its output.
"""
from __future__ import annotations

from torch import nn

from rankwise.config import ConfigError
from rankwise.ffba.layers import Adapter, FusedAttention, FusedMLP, Parallel
from rankwise.ffba.settings import Settings

# model_type -> architecture; each has q/k/v/o attention with rotary embeddings and a gated MLP
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MODULE = {"attn": "self_attn", "mlp": "mlp"}
FUSED = {"attn": FusedAttention, "mlp": FusedMLP}
PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def supported_text() -> str:
    return ", ".join(f"{arch} (model_type {t!r})" for t, arch in SUPPORTED.items())


def check_architecture(model_type: str | None, architectures=None, where: str = "model") -> None:
    """Raise ConfigError unless the fused form supports this architecture."""
    if model_type not in SUPPORTED:
        named = f"{model_type!r}" + (f" ({', '.join(architectures)})" if architectures else "")
        raise ConfigError(f"ffba: {where} has architecture {named}, which the fused adapter does not support; "
                          f"supported: {supported_text()}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, after checking each has the sub-blocks FFBA rewrites."""
    config = model.config
    check_architecture(getattr(config, "model_type", None), getattr(config, "architectures", None))
    layers = model.get_decoder().layers
    for i, layer in enumerate(layers):
        for block, names in PROJECTIONS.items():
            module = getattr(layer, MODULE[block], None)
            module = module.block if isinstance(module, Parallel) else module
            if module is None or not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
                raise ConfigError(f"ffba: layer {i} has no {MODULE[block]} with linear {', '.join(names)}; "
                                  f"supported: {supported_text()}")
    return layers


def inject(model: nn.Module, settings: Settings) -> nn.Module:
    """Freeze the base model and put an unfused adapter beside each chosen sub-block (in place)."""
    layers = decoder_layers(model)
    model.requires_grad_(False)
    d = model.config.hidden_size
    for layer in layers:
        for block in settings.blocks:
            base = getattr(layer, MODULE[block])
            weight = getattr(base, PROJECTIONS[block][0]).weight
            adapter = Adapter(d, settings.rank, settings.alpha, settings.activation, settings.dropout)
            setattr(layer, MODULE[block], Parallel(base, adapter.to(weight.device, weight.dtype)))
    return model


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The adapters of an unfused model by name, e.g. 'layers.3.attn'."""
    found = {}
    for i, layer in enumerate(model.get_decoder().layers):
        for block, name in MODULE.items():
            module = getattr(layer, name)
            if isinstance(module, Parallel):
                found[f"layers.{i}.{block}"] = module.adapter
    return found


def fuse(model: nn.Module) -> nn.Module:
    """Replace every unfused sub-block by its fused form (in place); the result is for inference only."""
    for layer in model.get_decoder().layers:
        for block, name in MODULE.items():
            module = getattr(layer, name)
            if isinstance(module, Parallel):
                setattr(layer, name, FUSED[block](module.block, module.adapter))
    return model.requires_grad_(False)
