"""LoRA-Pre's Muon variant: Muon's momentum held as one rank-r factor pair per 2-D weight.

    m_t = mu (m_B m_A)_{t-1} + g_t          (current gradient at full rank, history low rank)
    (m_B, m_A) advance toward g_t / (1 - mu) with 1 - gamma = sqrt(mu), so their product tracks m_t
    theta <- theta - lr * scale * 0.2 sqrt(max(p, q)) * NewtonSchulz(m_t)   (+ decoupled weight decay)
The 0.2 sqrt(max(p, q)) factor gives the orthogonalised update AdamW's typical RMS (Moonlight), so one
learning rate serves both the Muon-stepped matrices and the AdamW-stepped rest (embeddings, norms, head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.optim import register
from rankwise.optim.lora_pre import (FULL_WEIGHTS, LoRAPreOptions, _apply, _LowRankOptimizer, advance_factors,
                                     low_rank_factory)
from rankwise.options import BOOL, POSITIVE_INT, check, is_number

__all__ = ["LoRAPreMuon", "newton_schulz"]


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (U S V^T -> ~U V^T) with Muon's quintic Newton-Schulz iteration;
    a G x p x q batch is orthogonalised matrix by matrix, in batched matmuls."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # spectral norm <= Frobenius norm <= 1, inside the iteration's basin
    X = G / (torch.linalg.matrix_norm(G, keepdim=True) + 1e-7)
    tall = X.shape[-2] > X.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class LoRAPreMuon(_LowRankOptimizer):
    """Muon with rank-r fp32 momentum factors m_B (p x r), m_A (r x q): r (p + q) floats per weight.

    Groups with rank=0 and non-2-D tensors get plain AdamW (betas, eps). `scale` multiplies the Muon update.
    """

    def __init__(self, params, lr: float = 1e-3, rank: int = 16, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 delta: float = 1e-6, scale: float = 1.0, init_std: float = 0.02):
        if lr < 0 or rank < 0 or delta <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid LoRAPreMuon settings: lr={lr} rank={rank} delta={delta} momentum={momentum}")
        defaults = dict(lr=lr, rank=rank, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta, scale=scale,
                        init_std=init_std)
        super().__init__(params, defaults)

    factor_names = ("m_B", "m_A")

    def _step_low_rank(self, params, g, factors, group, t) -> None:
        mu = group["momentum"]
        gamma = 1 - math.sqrt(mu)  # (1-gamma)^2 = mu: the factor product decays at mu
        m_B, m_A = factors["m_B"], factors["m_A"]
        m = (m_B @ m_A).mul_(mu).add_(g)
        # regress g / (1 - mu): the product then moves to mu * history + g, i.e. to m_t
        advance_factors(m_B, m_A, g / (1 - mu), gamma, group["delta"])
        direction = g.add_(m, alpha=mu) if group["nesterov"] else m  # g is this step's own copy
        rms_match = 0.2 * math.sqrt(max(params[0].shape))
        _apply(params, newton_schulz(direction, group["ns_steps"]), group, group["scale"] * rms_match)


@dataclass(frozen=True)
class LoRAPreMuonOptions(LoRAPreOptions):
    """optimizer_args of optimizer=lorapre-muon: LoRA-Pre's, and Muon's own."""

    momentum: float | None = None
    nesterov: bool | None = None
    ns_steps: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check(self, "optimizer_args.", {"momentum": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
                                        "nesterov": BOOL, "ns_steps": POSITIVE_INT})


register("lorapre-muon", low_rank_factory(LoRAPreMuon), LoRAPreMuonOptions, **FULL_WEIGHTS)
