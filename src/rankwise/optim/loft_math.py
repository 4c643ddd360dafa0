"""The small linear algebra LoFT needs, kept apart from the optimizer's bookkeeping.

Every routine works on a *left factor* L (p×r) whose partner is R (r×q), so that the update is
W = W0 + L·R. LoRA's B is the left factor of W (L = s·B, R = A); A is the left factor of Wᵀ
(L = Aᵀ, R = (s·B)ᵀ). One code path therefore serves both factors.

Per-row r×r second-moment matrices are symmetric, so they are stored packed: only the T = r(r+1)/2
entries with k ≤ l, one row of length T per row of L. All of it stays O((p + q)·r²); the dense
(p, r, q) intermediate of the reference implementation is never formed.
"""
from __future__ import annotations

import torch


def ridge_inverse(R: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R Rᵀ, (R Rᵀ + δI)⁻¹), both r×r in R's dtype; δ = ridge · mean eigenvalue of R Rᵀ.

    The ridge is relative so that it means the same at any scale of the factors; a factor that is
    exactly zero (B at initialisation) gets δ = 1, which is harmless because its partner's gradient
    is then zero too. Computed in float64: r×r, so the cost is nil and fp32 factors stay stable.
    """
    r = R.shape[0]
    gram = R.double() @ R.double().T
    trace = gram.diagonal().sum()
    delta = torch.where(trace > 0, ridge * trace / r, torch.ones_like(trace))
    inverse = torch.linalg.inv(gram + delta * torch.eye(r, dtype=gram.dtype, device=gram.device))
    return gram.to(R.dtype), inverse.to(R.dtype)


def packed_index(r: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (k, l) of the upper triangle k ≤ l of an r×r matrix, and weights 1 (k = l) or 2 (k < l)."""
    k, l = torch.triu_indices(r, r, device=device)
    weight = torch.where(k == l, 1.0, 2.0).to(device)
    return k, l, weight


def packed_outer(g: torch.Tensor, k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Row-wise outer products g[i]ᵀ g[i], packed: (p, r) -> (p, T)."""
    return g[:, k] * g[:, l]


def quad_basis(R: torch.Tensor, k, l, weight) -> torch.Tensor:
    """(T, q) matrix Q with packed(P_i) @ Q[:, j] = R[:, j]ᵀ P_i R[:, j] for symmetric P_i."""
    return weight.to(R.dtype)[:, None] * R[k] * R[l]


def congruence(C: torch.Tensor, k, l) -> torch.Tensor:
    """(T, T) matrix K with packed(Cᵀ P C) = packed(P) @ K for every symmetric r×r P.

    (Cᵀ P C)[a, b] = Σ_{k≤l} P[k, l]·(C[k, a] C[l, b] + C[l, a] C[k, b]), the second term only for k < l.
    """
    ka, lb = C[k][:, k], C[l][:, l]  # rows: (k, l) of P; columns: (a, b) of the result
    la, kb = C[l][:, k], C[k][:, l]
    off_diagonal = (k != l).to(C.dtype)[:, None]
    return ka * lb + off_diagonal * la * kb


def unpack(packed: torch.Tensor, r: int, k, l) -> torch.Tensor:
    """(p, T) -> (p, r, r) symmetric; for tests and inspection only (it is the r× larger form)."""
    full = packed.new_zeros(packed.shape[0], r, r)
    full[:, k, l] = packed
    full[:, l, k] = packed
    return full
