"""LoFT-AdamW: LoRA whose optimizer moves W the way AdamW on W would, inside the factors' subspaces.

Tastan et al., "LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning" (arXiv 2505.21289).
With W = W0 + s·B·A the six blocks are (spec: docs of this repo, shared/specs/loft.md):
  1. alternating updates, B first; both factors' moments update every step,
  2. scaled gradients g̃_B = g_B (AAᵀ+δI)⁻¹, g̃_A = (BᵀB+δI)⁻¹ g_A, in the s = 1 frame (alpha is inert),
  3. first-moment transport m_B ← m_B·C when A changed since the moment was accumulated,
  4. per-row r×r second moments P_i, rebuilt as V̂[i,j] = A[:,j]ᵀ P_i A[:,j], transported P ← Cᵀ P C,
  5. the Adam direction formed in W's space and projected back, decoupled decay (1 − lr·λ),
  6. gradient clipping on the projected full gradients.
"simple" keeps blocks 1, 2, 3 and 6 with an elementwise second moment in factor shape.

Both factors run through one routine on a left factor L with partner R (see loft_math): for B,
L = s·B and R = A; for A, L = Aᵀ and R = (s·B)ᵀ. State of A is therefore kept transposed (n×r).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from rankwise.config import Config, ConfigError
from rankwise.optim import closure_loss, register
from rankwise.optim.loft_math import congruence, packed_index, packed_outer, quad_basis, ridge_inverse

__all__ = ["LoFT"]


@dataclass
class _Side:
    """One factor seen as the left factor L of W = W0 + L·R (or of Wᵀ), in the s = 1 frame."""

    param: torch.nn.Parameter
    L: torch.Tensor  # p×r; a view of the parameter for A, s·B for B
    R: torch.Tensor  # r×q, the partner before this step's update
    g: torch.Tensor  # ∂loss/∂L
    unit: float  # parameter change per unit change of L (1/s for B, 1 for A)
    transposed: bool  # the parameter is Lᵀ (A)


def _sides(A: torch.nn.Parameter, B: torch.nn.Parameter, scale: float) -> tuple[_Side, _Side]:
    """(B side, A side). g_B = s·G·Aᵀ is s times ∂/∂(sB); g_A = s·Bᵀ·G = (sB)ᵀ·G already."""
    sB = B.detach() * scale
    side_B = _Side(B, sB, A.detach(), B.grad / scale, 1.0 / scale, False)
    side_A = _Side(A, A.detach().T, sB.T, A.grad.T, 1.0, True)
    return side_B, side_A


class LoFT(torch.optim.Optimizer):
    """LoFT-AdamW over explicit LoRA pairs, plus plain AdamW for every other tensor given.

    pairs: (A, B, scale) triples with A r×n, B m×r and the adapter scale s (PEFT's `scaling`),
    so that W = W0 + s·B·A; the dynamics of W do not depend on s. params: other tensors (AdamW).
    Use `LoFT.from_peft_model` to build the pairs from a PEFT LoRA model's layers.
    ridge: δ relative to the mean eigenvalue of the partner's Gram matrix. max_grad_norm: clip the
    projected full gradients (block 6); 0 disables. Step 1 moves B, step 2 A, and so on.
    """

    clips_gradients = True  # block 6 clips projected gradients; a loop should not clip raw ones before

    def __init__(self, pairs, params=(), lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, ridge: float = 1e-6, simple: bool = False,
                 max_grad_norm: float = 0.0):
        pairs = [(A, B, float(scale)) for A, B, scale in pairs]
        if not pairs:
            raise ValueError("LoFT needs at least one LoRA pair (A, B, scale)")
        for A, B, _ in pairs:
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise ValueError(f"LoRA pair shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        if lr < 0 or eps < 0 or weight_decay < 0 or ridge < 0 or max_grad_norm < 0:
            raise ValueError("lr, eps, weight_decay, ridge and max_grad_norm must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        groups = [{"params": [p for A, B, _ in pairs for p in (A, B)], "lora": True}]
        others = list(params)
        if others:
            groups.append({"params": others, "lora": False})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, ridge=ridge,
                        simple=simple, max_grad_norm=max_grad_norm)
        super().__init__(groups, defaults)
        self._pairs = pairs

    @classmethod
    def from_peft_model(cls, model: torch.nn.Module, **options) -> "LoFT":
        """Pair every trainable Linear LoRA adapter by walking PEFT's LoraLayer modules.

        Every other trainable tensor (biases, embedding adapters, modules_to_save) gets AdamW.
        Raises ValueError for DoRA adapters, where W is not W0 + s·B·A.
        """
        from peft.tuners.lora import LoraLayer

        pairs, paired = [], set()
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name, a in module.lora_A.items():
                b = module.lora_B[name]
                if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
                    continue
                if not (a.weight.requires_grad and b.weight.requires_grad):
                    continue
                if name in module.lora_magnitude_vector:
                    raise ValueError("LoFT needs plain LoRA factors; DoRA's magnitude makes W ≠ W0 + s·B·A")
                pairs.append((a.weight, b.weight, module.scaling[name]))
                paired.update((id(a.weight), id(b.weight)))
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
        return cls(pairs, others, **options)

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        lora = self.param_groups[0]
        work = []  # per pair: both sides with their scaled gradients, before anything moves
        norms_sq = []  # squared norms, kept on the device: one host sync per step
        for A, B, scale in self._pairs:
            if A.grad is None or B.grad is None:
                continue
            step = self.state[B].get("step", 0) + 1
            active = 0 if step % 2 == 1 else 1  # block 1: B on odd steps, A on even ones
            sides = _sides(A, B, scale)
            scaled = []
            for i, side in enumerate(sides):
                gram, inverse = ridge_inverse(side.R, lora["ridge"])
                g_tilde = side.g @ inverse  # block 2: g̃·R = G·P_R, the projected full gradient
                scaled.append((g_tilde, inverse))
                if i == active:  # block 6 counts the active factor's projected gradient ‖g̃·R‖
                    norms_sq.append(((g_tilde @ gram) * g_tilde).sum().double())
            work.append((sides, scaled, active, step))
        others = [p for g in self.param_groups[1:] for p in g["params"] if p.grad is not None]
        norms_sq += [p.grad.double().pow(2).sum() for p in others]
        self.last_grad_norm = math.sqrt(float(sum(n.to(norms_sq[0].device) for n in norms_sq))) if norms_sq else 0.0
        coef = 1.0
        if lora["max_grad_norm"] > 0:
            coef = min(1.0, lora["max_grad_norm"] / (self.last_grad_norm + 1e-6))

        for sides, scaled, active, step in work:
            for i, (side, (g_tilde, inverse)) in enumerate(zip(sides, scaled)):
                self._side_step(lora, side, g_tilde * coef, inverse, step, i == active)
        for group in self.param_groups[1:]:
            self._adamw(group, coef)
        return loss

    def _side_step(self, group, side: _Side, g_tilde, inverse, step: int, active: bool) -> None:
        state = self.state[side.param]
        beta1, beta2 = group["betas"]
        simple = group["simple"]
        p, r = side.L.shape
        k, l, weight = packed_index(r, side.L.device)
        if not state:
            state["exp_avg"] = side.L.new_zeros(p, r)
            state["exp_avg_sq" if simple else "row_sq"] = side.L.new_zeros(p, r if simple else k.numel())
            state["partner_prev"] = side.R.clone(memory_format=torch.contiguous_format)
        elif not torch.equal(state["partner_prev"], side.R):
            # blocks 3-4: re-express the moments in the partner's new basis, C = (R_old Rᵀ)(R Rᵀ + δI)⁻¹
            C = (state["partner_prev"] @ side.R.T) @ inverse
            state["exp_avg"] = state["exp_avg"] @ C
            if not simple:
                state["row_sq"] = state["row_sq"] @ congruence(C, k, l)  # P ← Cᵀ P C, packed
            state["partner_prev"].copy_(side.R)
        state["step"] = step
        m = state["exp_avg"].mul_(beta1).add_(g_tilde, alpha=1 - beta1)
        if simple:
            v = state["exp_avg_sq"].mul_(beta2).addcmul_(g_tilde, g_tilde, value=1 - beta2)
        else:
            P = state["row_sq"].mul_(beta2).add_(packed_outer(g_tilde, k, l), alpha=1 - beta2)
        if not active:
            return
        lr, eps = group["lr"], group["eps"]
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        if simple:
            direction = m / (v / bc2).sqrt_().add_(eps)
        else:
            # block 5: Adam direction in W's space, D = (m·R) ⊘ (sqrt(V̂/bc2) + ε), projected back
            D = m @ side.R
            V = (P @ quad_basis(side.R, k, l, weight)).clamp_(min=0)
            D.div_(V.div_(bc2).sqrt_().add_(eps))
            direction = (D @ side.R.T) @ inverse
            del D, V
        target = side.param.T if side.transposed else side.param
        target.mul_(1 - lr * group["weight_decay"]).add_(direction, alpha=-lr / bc1 * side.unit)

    def _adamw(self, group, coef: float) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            g = p.grad * coef
            state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc1, bc2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"] / bc2).sqrt_().add_(group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"]).addcdiv_(state["exp_avg"], denom,
                                                                     value=-group["lr"] / bc1)


# ---- the recipe's registry entry -----------------------------------------------------------------
OPTIONS = {"simple": bool, "ridge": float, "eps": float, "max_grad_norm": float}
LORA_METHODS = ("lora",)  # methods whose trainable update is exactly W0 + s·B·A


def _check(cfg: Config) -> None:
    unknown = set(cfg.optimizer_args) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"optimizer 'loft' does not take optimizer_args {sorted(unknown)}; "
                          f"choose from {sorted(OPTIONS)}")
    for key, kind in OPTIONS.items():
        value = cfg.optimizer_args.get(key)
        if value is None:
            continue
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"optimizer_args.{key} must be true or false, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 <= value <= sys.float_info.max):  # nan and inf fail too
            raise ConfigError(f"optimizer_args.{key} must be a finite number >= 0, got {value!r}")
    if cfg.method not in LORA_METHODS:
        raise ConfigError(f"optimizer 'loft' needs LoRA factors (method in {list(LORA_METHODS)}), "
                          f"got method={cfg.method!r}")


def _build(model: torch.nn.Module, cfg: Config) -> LoFT:
    args = dict(cfg.optimizer_args)
    args.setdefault("max_grad_norm", cfg.clip)  # the recipe's clip, applied to projected gradients
    return LoFT.from_peft_model(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **args)


register("loft", _build, _check)
