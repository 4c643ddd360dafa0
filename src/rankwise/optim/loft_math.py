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
    R may carry leading batch dimensions (…, r, q); each matrix gets its own δ.
    """
    R64 = R.double()
    gram, inverse = regularised_inverse(R64 @ R64.mT, ridge)
    return gram.to(R.dtype), inverse.to(R.dtype)


def regularised_inverse(gram: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gram, (gram + δI)⁻¹) for a batch (…, r, r) of Gram matrices, δ per matrix as in ridge_inverse."""
    r = gram.shape[-1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    delta = torch.where(trace > 0, trace * (ridge / r), torch.ones_like(trace))
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    # inv_ex: no error check, which would wait on an accelerator; gram + δI (δ > 0) is positive definite
    return gram, torch.linalg.inv_ex(torch.addcmul(gram, delta[..., None, None], eye)).inverse


def packed_index(r: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (k, l) of the upper triangle k ≤ l of an r×r matrix, and weights 1 (k = l) or 2 (k < l)."""
    k, l = torch.triu_indices(r, r, device=device)
    weight = torch.where(k == l, 1.0, 2.0).to(device)
    return k, l, weight


def packed_outer(g: torch.Tensor, k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Row-wise outer products g[i]ᵀ g[i], packed: (…, p, r) -> (…, p, T).

    The packed order (k, l) is row by row of the upper triangle, so row k of the triangle is the slice
    g[k]·g[k:]; slices are several times faster than gathering g[k] and g[l] column by column on a CPU.
    """
    r = g.shape[-1]
    if k.numel() != r * (r + 1) // 2:
        return g.index_select(-1, k) * g.index_select(-1, l)  # not the full upper triangle
    return torch.cat([g[..., i:i + 1] * g[..., i:] for i in range(r)], dim=-1)


def quad_basis(R: torch.Tensor, k, l, weight) -> torch.Tensor:
    """(…, T, q) matrix Q with packed(P_i) @ Q[:, j] = R[:, j]ᵀ P_i R[:, j] for symmetric P_i; R is (…, r, q)."""
    return weight.to(R.dtype)[:, None] * R.index_select(-2, k) * R.index_select(-2, l)


def congruence(C: torch.Tensor, k, l) -> torch.Tensor:
    """(T, T) matrix K with packed(Cᵀ P C) = packed(P) @ K for every symmetric r×r P.

    (Cᵀ P C)[a, b] = Σ_{k≤l} P[k, l]·(C[k, a] C[l, b] + C[l, a] C[k, b]), the second term only for k < l.
    Batches put their dimensions between the two matrix dimensions: C (r, …, r) gives K (T, …, T).
    In that layout C.T is still the batch of transposes, as it is for one r×r matrix.
    """
    r, batch = C.shape[0], C.shape[1:-1]
    # O[x, y, …, t] = C[x, a_t]·C[y, b_t] for the packed columns t = (a, b)
    O = C.index_select(-1, k)[:, None] * C.index_select(-1, l)[None]
    off_diagonal = 1 - torch.eye(r, dtype=C.dtype, device=C.device)
    # rows x ≠ y also collect C[y, a]·C[x, b]; then keep the rows (x, y) = (k, l) with k ≤ l
    O = O + off_diagonal.view(r, r, *[1] * len(batch), 1) * O.transpose(0, 1)
    return O.flatten(0, 1).index_select(0, k * r + l)


def unpack(packed: torch.Tensor, r: int, k, l) -> torch.Tensor:
    """(p, T) -> (p, r, r) symmetric; for tests and inspection only (it is the r× larger form)."""
    full = packed.new_zeros(packed.shape[0], r, r)
    full[:, k, l] = packed
    full[:, l, k] = packed
    return full
