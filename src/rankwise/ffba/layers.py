"""Fused forward-backward adapters (FFBA): the adapter, its unfused training form, its fused inference form.

Around a sub-block f (attention or MLP) whose input is the normed hidden state x:

    y = f(x) + s · B · φ(A · x)          A: r×d (down), B: d×r (up, zero at init), s = alpha / r

Unfused (training): f runs as usual and the adapter adds two small GEMMs.
Fused (inference): A becomes r extra output rows of the projection that already reads x
([W_q; W_k; W_v; A] or [W_gate; W_up; A]) and s·B becomes r extra input columns of the projection
that already writes y ([W_o | s·B] or [W_down | s·B]), so the adapter adds no GEMM of its own.
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


def _stack_rows(linears: list[nn.Linear], A: torch.Tensor) -> nn.Linear:
    """One Linear whose output is [W_1·x; …; W_n·x; A·x] (A gets a zero bias when the others have one)."""
    weight = torch.cat([l.weight for l in linears] + [A.to(linears[0].weight.dtype)], dim=0)
    has_bias = any(l.bias is not None for l in linears)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if has_bias:
            parts = [l.bias if l.bias is not None else torch.zeros_like(l.weight[:, 0]) for l in linears]
            fused.bias.copy_(torch.cat(parts + [torch.zeros_like(A[:, 0])]))
    return fused.requires_grad_(False)


def _stack_columns(linear: nn.Linear, sB: torch.Tensor) -> nn.Linear:
    """One Linear computing [W | s·B]·[h; φ(z)] = W·h + s·B·φ(z)."""
    weight = torch.cat([linear.weight, sB.to(linear.weight.dtype)], dim=1)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if linear.bias is not None:
            fused.bias.copy_(linear.bias)
    return fused.requires_grad_(False)


class FusedAttention(nn.Module):
    """Llama-family attention with the adapter folded in: qkvz = [W_q;W_k;W_v;A]·x, o = [W_o|s·B]·[attn;φ(z)].

    Mirrors transformers' LlamaAttention.forward (rotary embedding, KV cache update, the configured
    attention function), so caching and `generate` work unchanged.
    """

    def __init__(self, attn: nn.Module, adapter: Adapter):
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.num_key_value_groups = attn.head_dim, attn.num_key_value_groups
        self.scaling, self.attention_dropout, self.is_causal = attn.scaling, attn.attention_dropout, attn.is_causal
        # Mistral reads it from the config, Qwen2 per layer; Llama has none
        self.sliding_window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        model_module = sys.modules[type(attn).__module__]  # the model's own rotary and eager attention
        self.rotary, self.eager = model_module.apply_rotary_pos_emb, model_module.eager_attention_forward
        self.splits = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features, adapter.rank]
        self.activation = adapter.activation
        self.phi = ACTIVATIONS[adapter.activation]
        self.qkvz = _stack_rows([attn.q_proj, attn.k_proj, attn.v_proj], adapter.A.detach())
        self.o_proj = _stack_columns(attn.o_proj, adapter.scale * adapter.B.detach())

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = cache if cache is not None else past_key_values  # transformers renamed the argument to `cache`

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v, z = self.qkvz(hidden_states).split(self.splits, dim=-1)
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
        return self.o_proj(torch.cat([out, self.phi(z)], dim=-1)), weights

    def extra_repr(self) -> str:
        return f"splits(q,k,v,z)={self.splits}, activation={self.activation}"


class FusedMLP(nn.Module):
    """Gated MLP with the adapter folded in: [g;u;z] = [W_gate;W_up;A]·x, y = [W_down|s·B]·[act(g)·u; φ(z)]."""

    def __init__(self, mlp: nn.Module, adapter: Adapter):
        super().__init__()
        self.act_fn = mlp.act_fn
        self.splits = [mlp.gate_proj.out_features, mlp.up_proj.out_features, adapter.rank]
        self.activation = adapter.activation
        self.phi = ACTIVATIONS[adapter.activation]
        self.gate_up_z = _stack_rows([mlp.gate_proj, mlp.up_proj], adapter.A.detach())
        self.down_proj = _stack_columns(mlp.down_proj, adapter.scale * adapter.B.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, z = self.gate_up_z(x).split(self.splits, dim=-1)
        return self.down_proj(torch.cat([self.act_fn(g) * u, self.phi(z)], dim=-1))

    def extra_repr(self) -> str:
        return f"splits(gate,up,z)={self.splits}, activation={self.activation}"
