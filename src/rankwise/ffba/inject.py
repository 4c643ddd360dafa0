"""Model surgery on Llama-family decoder layers: add forward and/or backward adapters, or fuse them in.

Each decoder layer calls `self_attn(hidden_states=norm(h), ...)` and `mlp(norm(h))`, so replacing those two
modules is enough for a forward adapter (it sees the sub-block's normed input and adds to its output).
A backward adapter wraps projections inside them instead: the projection of one sub-block whose input it
reads (o_proj or down_proj with reads=hidden, q_proj or gate_proj with reads=normed) and the input
projections of the next (the same layer's gate/up, the next layer's q/k/v).
The last layer's MLP has no next sub-block, so it gets no backward adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.config import ConfigError
from rankwise.ffba.layers import Adapter, Carrier, Emit, FusedAttention, FusedMLP, Parallel, Receive, plain, wrapper
from rankwise.ffba.settings import Settings

# model_type -> architecture; each has q/k/v/o attention with rotary embeddings and a gated MLP
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MODULE = {"attn": "self_attn", "mlp": "mlp"}
FUSED = {"attn": FusedAttention, "mlp": FusedMLP}
PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
INPUTS = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}  # read the normed x
OUTPUT = {"attn": "o_proj", "mlp": "down_proj"}  # writes the sub-block's output
NEXT = {"attn": ("mlp", 0), "mlp": ("attn", 1)}  # the sub-block after each one: (block, layer offset)


def read_projection(block: str, reads: str) -> str:
    """The projection whose input a backward adapter after `block` reads: the output projection's (hidden)
    or the first input projection's, i.e. the sub-block's normed input (normed)."""
    return OUTPUT[block] if reads == "hidden" else INPUTS[block][0]


def supported_text() -> str:
    return ", ".join(f"{arch} (model_type {t!r})" for t, arch in SUPPORTED.items())


def check_architecture(model_type: str | None, architectures=None, where: str = "model") -> None:
    """Raise ConfigError unless the fused form supports this architecture."""
    if model_type not in SUPPORTED:
        named = f"{model_type!r}" + (f" ({', '.join(architectures)})" if architectures else "")
        raise ConfigError(f"ffba: {where} has architecture {named}, which the fused adapter does not support; "
                          f"supported: {supported_text()}")


def sub_block(layer: nn.Module, block: str) -> nn.Module:
    """The attention or MLP module of a decoder layer, under its forward adapter if it has one."""
    module = getattr(layer, MODULE[block], None)
    return module.block if isinstance(module, Parallel) else module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, after checking each has the sub-blocks FFBA rewrites."""
    config = model.config
    check_architecture(getattr(config, "model_type", None), getattr(config, "architectures", None))
    layers = model.get_decoder().layers
    for i, layer in enumerate(layers):
        for block, names in PROJECTIONS.items():
            module = sub_block(layer, block)
            if module is None or not all(isinstance(plain(getattr(module, n, None)), nn.Linear) for n in names):
                raise ConfigError(f"ffba: layer {i} has no {MODULE[block]} with linear {', '.join(names)}; "
                                  f"supported: {supported_text()}")
    return layers


def junction_sites(n_layers: int, blocks) -> list[tuple[int, str, int, str]]:
    """(layer, block, next layer, next block) for every backward adapter: after each chosen sub-block that
    has a next one (so not after the last layer's MLP)."""
    sites = []
    for i in range(n_layers):
        for block in ("attn", "mlp"):
            nxt, offset = NEXT[block]
            if block in blocks and i + offset < n_layers:
                sites.append((i, block, i + offset, nxt))
    return sites


def inject(model: nn.Module, settings: Settings) -> nn.Module:
    """Freeze the base model and add the unfused adapters `settings` describe (in place)."""
    layers = decoder_layers(model)
    model.requires_grad_(False)
    d, scale = model.config.hidden_size, settings.scale
    if settings.forward_rank:
        for layer in layers:
            for block in settings.blocks:
                base = getattr(layer, MODULE[block])
                weight = getattr(base, PROJECTIONS[block][0]).weight
                adapter = Adapter(d, settings.forward_rank, settings.alpha, settings.activation, settings.dropout)
                adapter.scale = scale  # s = alpha / rank with the total rank, for every adapter alike
                setattr(layer, MODULE[block], Parallel(base, adapter.to(weight.device, weight.dtype)))
    if settings.backward_rank:
        sites = junction_sites(len(layers), settings.blocks)
        if not sites:
            raise ConfigError(f"ffba: a {len(layers)}-layer model has no junction for a backward adapter after "
                              f"{'+'.join(settings.blocks)} (the last MLP has no next sub-block)")
        carrier, r = Carrier(), settings.backward_rank
        for i, block, j, nxt in sites:
            key = f"layers.{i}.{block}"
            source, target = sub_block(layers[i], block), sub_block(layers[j], nxt)
            name = read_projection(block, settings.reads)
            setattr(source, name, Emit(getattr(source, name), r, carrier, key, settings.dropout))
            for name in INPUTS[nxt]:
                setattr(target, name, Receive(getattr(target, name), r, scale, settings.activation, carrier, key))
    return model


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The forward adapters of an unfused model by name, e.g. 'layers.3.attn'."""
    found = {}
    for i, layer in enumerate(model.get_decoder().layers):
        for block, name in MODULE.items():
            module = getattr(layer, name)
            if isinstance(module, Parallel):
                found[f"layers.{i}.{block}"] = module.adapter
    return found


@dataclass
class Junction:
    """One backward adapter of an unfused model: A on `emit`'s input, B split by rows over `receivers`
    (the next sub-block's input projections, in the order q, k, v or gate, up)."""

    emit: Emit
    receivers: list[Receive]

    @property
    def A(self) -> torch.Tensor:
        """r × d_in of the projection it reads (hidden: the output projection; normed: the hidden size)."""
        return self.emit.A

    @property
    def B(self) -> torch.Tensor:
        """(sum of the receivers' d_out) × r, unscaled (a copy: assign with `set_B`)."""
        return torch.cat([r.B.detach() for r in self.receivers])

    def set_B(self, B: torch.Tensor) -> None:
        with torch.no_grad():
            for r, part in zip(self.receivers, B.split([r.B.shape[0] for r in self.receivers])):
                r.B.copy_(part)

    def parameters(self) -> list[nn.Parameter]:
        return [self.emit.A] + [r.B for r in self.receivers]


def emit_of(module: nn.Module, block: str) -> tuple[Emit | None, bool]:
    """A sub-block's backward down-projection, if it has one, and whether it reads the normed input."""
    for reads in ("hidden", "normed"):
        emit = wrapper(getattr(module, read_projection(block, reads)), Emit)
        if emit is not None:
            return emit, reads == "normed"
    return None, False


def junctions(model: nn.Module) -> dict[str, Junction]:
    """The backward adapters of an unfused model by the sub-block they follow, e.g. 'layers.3.mlp'."""
    layers = model.get_decoder().layers
    found = {}
    for i, block, j, nxt in junction_sites(len(layers), ("attn", "mlp")):
        emit, _ = emit_of(sub_block(layers[i], block), block)
        if emit is not None:
            target = sub_block(layers[j], nxt)
            found[emit.key] = Junction(emit, [wrapper(getattr(target, n), Receive) for n in INPUTS[nxt]])
    return found


def fuse(model: nn.Module) -> nn.Module:
    """Replace every sub-block that has adapters by its fused form (in place); the result is for inference."""
    for layer in model.get_decoder().layers:
        for block, name in MODULE.items():
            module = getattr(layer, name)
            adapter = module.adapter if isinstance(module, Parallel) else None
            inner = sub_block(layer, block)
            emit, reads_input = emit_of(inner, block)
            receivers = [r for r in (wrapper(getattr(inner, n), Receive) for n in INPUTS[block]) if r is not None]
            if adapter or emit or receivers:
                setattr(layer, name, FUSED[block](inner, adapter, emit, receivers, reads_input))
    return model.requires_grad_(False)


def parameter_count(model: nn.Module, settings: Settings) -> int:
    """Trainable parameters `inject(model, settings)` would add, from the base model's shapes:
    2·d·r_fwd per forward-adapted sub-block, r_bwd·(d_in of the projection it reads + d_out of the next
    sub-block's input projections) per backward adapter."""
    layers = model.get_decoder().layers
    d = model.config.hidden_size
    total = 2 * d * settings.forward_rank * len(settings.blocks) * len(layers)
    for i, block, j, nxt in (junction_sites(len(layers), settings.blocks) if settings.backward_rank else []):
        d_in = plain(getattr(sub_block(layers[i], block), read_projection(block, settings.reads))).in_features
        d_out = sum(plain(getattr(sub_block(layers[j], nxt), n)).out_features for n in INPUTS[nxt])
        total += settings.backward_rank * (d_in + d_out)
    return total



def rank_for_budget(model: nn.Module, budget: int, **settings) -> int:
    """The rank r whose `parameter_count(model, Settings(rank=r, **settings))` is closest to `budget`
    trainable parameters (the smaller r on a tie); `settings` without rank and alpha (alpha does not count)."""
    def count(r: int) -> int:
        return parameter_count(model, Settings(rank=r, alpha=1.0, **settings))

    r = 1
    while count(r + 1) < budget:
        r += 1
    return r if abs(count(r) - budget) <= abs(count(r + 1) - budget) else r + 1
