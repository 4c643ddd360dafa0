"""Fused forward-backward adapters (FFBA): the adapters, their unfused training forms, their fused inference form.

Forward adapter, around a sub-block f (attention or MLP) whose input is the normed hidden state x:

    y = f(x) + s · B · φ(A · x)          A: r×d (down), B: d×r (up, zero at init), s = alpha / r

Backward adapter, across the residual junction after a sub-block: its up-projection adds to the *next*
sub-block's input projections (after attention: the same layer's gate/up; after the MLP: the next layer's
q/k/v); its down-projection reads, by `reads`, either the input h of the sub-block's output projection
("hidden": the attention output before o_proj, or the MLP hidden act(g)·u before down_proj) or the
sub-block's own normed input x ("normed": the input of q/k/v or gate/up, which the sub-block also reads):

    z = A · h   or   z = A · x           (carried past the residual add, never added to it)
    p' = W_p · x' + s · B_p · φ(z)       for each next input projection p, x' = that block's normed input

With reads=normed, B_p·A is a LoRA update of p whose input is one sub-block stale (x instead of x'): it
reads the whole residual stream, as LoRA on p does, and still fuses into GEMMs that already run.

Unfused (training): f runs as usual; the forward adapter adds two small GEMMs (`Parallel`), the backward
one wraps the projection it reads (`Emit`, writes z into a per-model `Carrier`) and the next input
projections (`Receive`, read it back).
Fused (inference): A's become extra output rows and s·B's extra input columns of projections that already
run ([W_q; W_k; W_v; A_fwd | s·B_bwd], [W_o | s·B_fwd ; A_bwd | 0], likewise for gate/up and down; with
reads=normed A_bwd is a row block of the first GEMM instead of the second), and z travels in the carrier's
slot, so no adapter adds a GEMM of its own.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"identity": lambda z: z, "relu": F.relu, "silu": F.silu}


class Adapter(nn.Module):
    """The trainable pair (A, B) of one sub-block; forward(x) = s · B · φ(A · x)."""

    def __init__(self, d: int, rank: int, alpha: float, activation: str = "identity", dropout: float = 0.0):
        super().__init__()
        self.rank, self.scale, self.activation = rank, alpha / rank, activation
        self.A = nn.Parameter(torch.empty(rank, d))
        self.B = nn.Parameter(torch.zeros(d, rank))  # zero: training starts exactly at the base model
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # same scale as nn.Linear's (and LoRA's) A
        self.phi = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(self.phi(F.linear(self.dropout(x), self.A)), self.B)

    def extra_repr(self) -> str:
        return f"d={self.A.shape[1]}, rank={self.rank}, scale={self.scale:g}, activation={self.activation}"


class Parallel(nn.Module):
    """Unfused form: the untouched sub-block plus its adapter on the same input (two extra small GEMMs)."""

    def __init__(self, block: nn.Module, adapter: Adapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.block(hidden_states, *args, **kwargs)
        delta = self.adapter(hidden_states)
        if isinstance(out, tuple):  # attention returns (output, attention weights)
            return (out[0] + delta, *out[1:])
        return out + delta


class Carrier:
    """Per-model slots for the backward adapters' z: the output projection that computes z writes its slot
    (keyed by junction, e.g. 'layers.3.mlp') and the next block's input projections read it; layers run in
    order, so within every forward pass a slot is written before it is read."""

    def __init__(self):
        self.z: dict[str, torch.Tensor] = {}

    def __getstate__(self):
        # deepcopy and pickle: the slots are the last pass's activations (and their graph), not state
        return {"z": {}}


class Emit(nn.Module):
    """Unfused backward down-projection: wraps the projection whose input h it reads (o_proj or down_proj
    with reads=hidden; q_proj or gate_proj, possibly already a `Receive`, with reads=normed); returns the
    wrapped module's output unchanged and writes z = A·h (A: r×d_in) into the carrier."""

    def __init__(self, linear: nn.Module, rank: int, carrier: Carrier, key: str, dropout: float = 0.0):
        super().__init__()
        self.linear, self.carrier, self.key = linear, carrier, key
        base = plain(linear)
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.carrier.z[self.key] = F.linear(self.dropout(h), self.A)
        return self.linear(h)

    def extra_repr(self) -> str:
        return f"writes={self.key}, rank={self.A.shape[0]}"


class Receive(nn.Module):
    """Unfused backward up-projection: wraps one input projection (q/k/v or gate/up): W·x + s·B·φ(z),
    z read from the carrier (B: d_out×r, zero at init)."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, activation: str, carrier: Carrier, key: str):
        super().__init__()
        self.linear, self.carrier, self.key = linear, carrier, key
        self.scale, self.activation, self.phi = scale, activation, ACTIVATIONS[activation]
        base = plain(linear)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.scale * F.linear(self.phi(self.carrier.z[self.key]), self.B)

    def extra_repr(self) -> str:
        return f"reads={self.key}, rank={self.B.shape[1]}, scale={self.scale:g}, activation={self.activation}"


def plain(module: nn.Module) -> nn.Module:
    """The base projection under any Emit/Receive wrappers (or the module itself)."""
    while isinstance(module, (Emit, Receive)):
        module = module.linear
    return module


def wrapper(module: nn.Module, kind: type) -> nn.Module | None:
    """The first `kind` (Emit or Receive) in a projection's chain of wrappers, or None."""
    while isinstance(module, (Emit, Receive)):
        if isinstance(module, kind):
            return module
        module = module.linear
    return None


def _scaled(B: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """s·B rounded once into the weights' dtype (the product is taken in fp32)."""
    return (scale * B.detach().float()).to(dtype)


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    return fused.requires_grad_(False)


def _input_projection(linears: list[nn.Linear], forward: Adapter | None, receivers: list[Receive],
                      emit: Emit | None = None) -> nn.Linear:
    """One Linear on [x; φ(z_in)] whose output is
    [W_1·x + s·B_1·φ(z_in); …; W_n·x + s·B_n·φ(z_in); A_fwd·x; A_bwd·x]:
    weight [[W_1, s·B_1], …, [W_n, s·B_n], [A_fwd, 0], [A_bwd, 0]] (the z_in columns only when receivers are
    given; the A_bwd rows only for an `emit` that reads the normed input)."""
    dtype = linears[0].weight.dtype
    extra = [m.A.detach().to(dtype) for m in (forward, emit) if m is not None]  # rows that read x only
    weight = torch.cat([l.weight for l in linears] + extra, dim=0)
    if receivers:
        rank_in = receivers[0].B.shape[1]
        columns = [_scaled(r.B, r.scale, dtype) for r in receivers] + [a.new_zeros(a.shape[0], rank_in) for a in extra]
        weight = torch.cat([weight, torch.cat(columns, dim=0)], dim=1)
    bias = None
    if any(l.bias is not None for l in linears):
        parts = [l.bias if l.bias is not None else l.weight.new_zeros(l.out_features) for l in linears]
        bias = torch.cat(parts + [a.new_zeros(a.shape[0]) for a in extra])
    return _frozen_linear(weight, bias)


def _output_projection(linear: nn.Linear, forward: Adapter | None, emit: Emit | None) -> nn.Linear:
    """One Linear on [h; φ(z_fwd)] whose output is [W·h + s·B_fwd·φ(z_fwd); A_bwd·h]:
    weight [[W, s·B_fwd], [A_bwd, 0]]."""
    dtype = linear.weight.dtype
    weight = linear.weight
    if forward:
        weight = torch.cat([weight, _scaled(forward.B, forward.scale, dtype)], dim=1)
    bias = linear.bias
    if emit:
        A = emit.A.detach().to(dtype)
        weight = torch.cat([weight, torch.cat([A, A.new_zeros(A.shape[0], weight.shape[1] - A.shape[1])], dim=1)])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(A.shape[0])])
    return _frozen_linear(weight, bias)


class _Slots:
    """What a fused sub-block takes from / gives to the carrier, and its forward adapter's φ. Its backward
    down-projection (`emit`) reads the first GEMM's input when `emit_reads_input`, else the second's."""

    def _init_slots(self, forward: Adapter | None, emit: Emit | None, receivers: list[Receive],
                    emit_reads_input: bool):
        parts = [m for m in (forward, *receivers) if m is not None]  # one activation per model (Settings)
        self.activation = parts[0].activation if parts else "identity"
        self.phi = ACTIVATIONS[self.activation]
        self.reads = receivers[0].key if receivers else None
        self.writes, self.emit_rank = (emit.key, emit.A.shape[0]) if emit else (None, 0)
        self.writes_from = None if emit is None else "input" if emit_reads_input else "output"
        self.carrier = emit.carrier if emit else receivers[0].carrier if receivers else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads is None:
            return x
        return torch.cat([x, self.phi(self.carrier.z[self.reads])], dim=-1)

    def _first(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The first GEMM's output split into its projections (and the forward adapter's z); a z for the
        next sub-block that reads the normed input goes to the carrier."""
        parts = list(y.split(self.splits, dim=-1))
        if self.writes_from == "input":
            self.carrier.z[self.writes] = parts.pop()
        return parts

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        if self.writes_from != "output":
            return y
        y, self.carrier.z[self.writes] = y.split([y.shape[-1] - self.emit_rank, self.emit_rank], dim=-1)
        return y

    def _slots_repr(self) -> str:
        return f", reads={self.reads}, writes={self.writes}"


class FusedAttention(nn.Module, _Slots):
    """Llama-family attention with the adapters folded in:
    [q;k;v;z_fwd] = [W_q;W_k;W_v;A_fwd | s·B_bwd]·[x; φ(z_in)],  [o; z_out] = [W_o, s·B_fwd; A_bwd, 0]·[attn; φ(z_fwd)].

    Mirrors transformers' LlamaAttention.forward (rotary embedding, KV cache update, the configured
    attention function), so caching and `generate` work unchanged. z_in (from the previous layer's MLP)
    and z_out (for this layer's MLP) travel in the carrier.
    """

    def __init__(self, attn: nn.Module, adapter: Adapter | None = None, emit: Emit | None = None,
                 receivers: list[Receive] | None = None, emit_reads_input: bool = False):
        super().__init__()
        receivers = receivers or []
        self._init_slots(adapter, emit, receivers, emit_reads_input)
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.num_key_value_groups = attn.head_dim, attn.num_key_value_groups
        self.scaling, self.attention_dropout, self.is_causal = attn.scaling, attn.attention_dropout, attn.is_causal
        # Mistral reads it from the config, Qwen2 per layer; Llama has none
        self.sliding_window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        model_module = sys.modules[type(attn).__module__]  # the model's own rotary and eager attention
        self.rotary, self.eager = model_module.apply_rotary_pos_emb, model_module.eager_attention_forward
        q, k, v, o = (plain(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.splits = ([q.out_features, k.out_features, v.out_features] + ([adapter.rank] if adapter else [])
                       + ([self.emit_rank] if emit_reads_input else []))
        self.qkvz = _input_projection([q, k, v], adapter, receivers, emit if emit_reads_input else None)
        self.o_proj = _output_projection(o, adapter, None if emit_reads_input else emit)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = cache if cache is not None else past_key_values  # transformers renamed the argument to `cache`

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v, *z = self._first(self.qkvz(self._input(hidden_states)))
        q = q.view(hidden_shape).transpose(1, 2)
        k = k.view(hidden_shape).transpose(1, 2)
        v = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        if self.sliding_window is not None:
            kwargs["sliding_window"] = self.sliding_window
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1)
        if z:
            out = torch.cat([out, self.phi(z[0])], dim=-1)
        return self._output(self.o_proj(out)), weights

    def extra_repr(self) -> str:
        return f"splits(q,k,v,z)={self.splits}, activation={self.activation}" + self._slots_repr()


class FusedMLP(nn.Module, _Slots):
    """Gated MLP with the adapters folded in: [g;u;z_fwd] = [W_gate;W_up;A_fwd | s·B_bwd]·[x; φ(z_in)],
    [y; z_out] = [W_down, s·B_fwd; A_bwd, 0]·[act(g)·u; φ(z_fwd)]."""

    def __init__(self, mlp: nn.Module, adapter: Adapter | None = None, emit: Emit | None = None,
                 receivers: list[Receive] | None = None, emit_reads_input: bool = False):
        super().__init__()
        receivers = receivers or []
        self._init_slots(adapter, emit, receivers, emit_reads_input)
        self.act_fn = mlp.act_fn
        gate, up, down = (plain(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        self.splits = ([gate.out_features, up.out_features] + ([adapter.rank] if adapter else [])
                       + ([self.emit_rank] if emit_reads_input else []))
        self.gate_up_z = _input_projection([gate, up], adapter, receivers, emit if emit_reads_input else None)
        self.down_proj = _output_projection(down, adapter, None if emit_reads_input else emit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, *z = self._first(self.gate_up_z(self._input(x)))
        h = self.act_fn(g) * u
        if z:
            h = torch.cat([h, self.phi(z[0])], dim=-1)
        return self._output(self.down_proj(h))

    def extra_repr(self) -> str:
        return f"splits(gate,up,z)={self.splits}, activation={self.activation}" + self._slots_repr()
