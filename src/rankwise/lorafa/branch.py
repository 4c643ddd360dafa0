"""The LoRA-FA adapter branch as one autograd Function: y = s · B · A · drop(x), A frozen.

What it saves for backward is the point of LoRA-FA: only u = A·drop(x) (tokens × r) and, when
dropout is on, a seed that regenerates the dropout mask. Never x (tokens × d_in) and never a mask.

Its backward returns, for B, the *corrected* gradient of LoRA-FA (paper v2, eq. for g̃_B):

    g̃_B = (1/s²) · g_B · (A Aᵀ + δI)⁻¹,   g_B = ∂L/∂B = s · gyᵀ u

so that the weight step it induces, s · Δ(B) · A, follows the full gradient projected on A's row
space. Any optimizer then runs on g̃_B unchanged (AdamW here; Fast Forward extrapolates B alone).
The input gradient is the exact one: ∂L/∂x = s · drop'(gy · B · A).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_inverse(A: torch.Tensor, delta: float) -> torch.Tensor:
    """(A Aᵀ + δI)⁻¹ for a frozen A (r × d_in), computed once in float64, returned as float32 (r × r)."""
    A64 = A.detach().double()
    gram = A64 @ A64.T + delta * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    # pinv, as PEFT's reference does: stays finite when r > d_in makes A Aᵀ singular
    return torch.linalg.pinv(gram, hermitian=True).float()


def _dropout_mask(shape, p: float, seed: int, dtype, device) -> torch.Tensor:
    """The same {0, 1/(1-p)} mask for the same seed: forward draws it, backward redraws it."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(1.0 - p, generator=gen)
    return keep.div_(1.0 - p).to(dtype)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


class FrozenABranch(torch.autograd.Function):
    """y = scaling · (drop(x) Aᵀ) Bᵀ; saves u = drop(x) Aᵀ only; B's gradient comes back corrected."""

    @staticmethod
    def forward(ctx, x, A, B, gram_inv, scaling: float, p: float):
        dtype = _compute_dtype(x, A)
        seed = None
        xd = x.to(dtype)
        if p > 0.0:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            xd = xd * _dropout_mask(xd.shape, p, seed, dtype, xd.device)
        u = F.linear(xd, A.to(dtype))  # tokens × r: the only activation kept
        y = F.linear(u, B.to(dtype)) * scaling
        ctx.save_for_backward(u, A, B, gram_inv)
        ctx.scaling, ctx.p, ctx.seed, ctx.dtype = scaling, p, seed, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        u, A, B, gram_inv = ctx.saved_tensors
        s = ctx.scaling
        gy2 = gy.reshape(-1, gy.shape[-1])
        u2 = u.reshape(-1, u.shape[-1])
        # g̃_B = (1/s²)·(s·gyᵀu)·(AAᵀ+δI)⁻¹ = (gyᵀu)·(AAᵀ+δI)⁻¹ / s
        grad_B = ((gy2.T.to(u2.dtype) @ u2).float() @ gram_inv).div_(s).to(B.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gu = (gy2 @ B.to(gy2.dtype)) * s  # tokens × r
            grad_x = (gu @ A.to(gu.dtype)).reshape(ctx.x_shape)
            if ctx.p > 0.0:
                grad_x = grad_x * _dropout_mask(grad_x.shape, ctx.p, ctx.seed, ctx.dtype, grad_x.device)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, grad_B, None, None, None


def frozen_a_branch(x, A, B, gram_inv, scaling: float, p: float = 0.0) -> torch.Tensor:
    """The adapter's contribution for input x (… × d_in) → (… × d_out); see FrozenABranch."""
    return FrozenABranch.apply(x, A, B, gram_inv, float(scaling), float(p))
