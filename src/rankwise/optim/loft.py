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

import functools
from dataclasses import dataclass

import torch

from rankwise.optim import OptimizerSpec, closure_loss, register
from rankwise.options import BOOL, FINITE_NON_NEGATIVE, check, set_fields
from rankwise.optim.batched import StackedState, adamw_, batches
from rankwise.optim.loft_math import congruence, packed_index, packed_outer, quad_basis, regularised_inverse

__all__ = ["LoFT"]


@dataclass
class _Side:
    """One factor of a batch of G same-shape pairs, seen as the left factor L of W = W0 + L·R (or of Wᵀ),
    in the s = 1 frame; every tensor carries the batch as its leading dimension."""

    params: list  # the G parameters this side moves (all B's, or all A's)
    R: torch.Tensor  # G×r×q, the partners before this step's update
    g: torch.Tensor  # G×p×r, ∂loss/∂L
    unit: float  # parameter change per unit change of L (1/s for B, 1 for A)
    transposed: bool  # the parameter is Lᵀ (A)
    gram: torch.Tensor | None = None  # R Rᵀ
    inverse: torch.Tensor | None = None  # (R Rᵀ + δI)⁻¹
    g_tilde: torch.Tensor | None = None  # g (R Rᵀ + δI)⁻¹, block 2


def _sides(pairs: list, scale: float) -> tuple[_Side, _Side]:
    """(B side, A side) of a batch of pairs. g_B = s·G·Aᵀ is s times ∂/∂(sB); g_A = s·Bᵀ·G = (sB)ᵀ·G already."""
    As, Bs = [A for A, _, _ in pairs], [B for _, B, _ in pairs]
    A = torch.stack(As)  # copies: the partners as they were before this step moves either factor
    sB = torch.stack(Bs).mul_(scale)
    side_B = _Side(Bs, A, torch.stack([B.grad for B in Bs]).div_(scale), 1.0 / scale, False)
    side_A = _Side(As, sB.mT, torch.stack([A.grad for A in As]).mT, 1.0, True)
    return side_B, side_A


def _scale_gradients(sides: list[_Side], ridge: float) -> None:
    """Block 2 for every side: gram, (gram + δI)⁻¹ and g̃ = g·(gram + δI)⁻¹ (so g̃·R = G·P_R).

    Every Gram matrix is r×r, whatever the pair's shape: all sides that share r, dtype and device are
    regularised and inverted together, in float64 (as ridge_inverse does for one)."""
    together: dict[tuple, list[tuple[_Side, torch.Tensor]]] = {}
    for side in sides:
        R64 = side.R.double()
        together.setdefault((side.R.shape[-2], side.R.dtype, side.R.device), []).append((side, R64 @ R64.mT))
    for (_, dtype, _), members in together.items():
        gram, inverse = regularised_inverse(torch.cat([gram for _, gram in members]), ridge)
        sizes = [len(side.params) for side, _ in members]
        for (side, _), g, inv in zip(members, gram.to(dtype).split(sizes), inverse.to(dtype).split(sizes)):
            side.gram, side.inverse = g, inv
            side.g_tilde = side.g @ inv


@functools.lru_cache(maxsize=None)
def _packed(r: int, device: torch.device):
    return packed_index(r, device)


@functools.lru_cache(maxsize=None)
def _eye(r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.eye(r, dtype=dtype, device=device)


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
        self._stacked = StackedState()  # the state of same-shape pairs, stacked
        self._grad_norm = None  # block 6's norm at the last step, a tensor on the device

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
    # Pairs are stepped in batches of the same shapes, dtype, device, scale and step count, each
    # batch's tensors stacked along a leading dimension: a step costs a fixed number of ops per batch,
    # not per pair, and nothing waits on the device (no host syncs) until `last_grad_norm` is read.

    @property
    def last_grad_norm(self) -> float:
        """The norm block 6 measured (projected LoRA gradients and the other tensors' gradients) at the last step."""
        return 0.0 if self._grad_norm is None else float(self._grad_norm)

    def _batches(self) -> list[list]:
        live = [pair for pair in self._pairs if pair[0].grad is not None and pair[1].grad is not None]
        return batches(
            live,
            key=lambda pair: (tuple(pair[0].shape), tuple(pair[1].shape), pair[0].dtype, pair[0].device,
                              pair[2], self.state[pair[1]].get("step", 0)),
            # the largest transients: p×q in block 5, only the factors' size in the simple variant
            size=lambda pair: (pair[1].numel() + pair[0].numel() if self.param_groups[0]["simple"]
                               else pair[1].shape[0] * pair[0].shape[1]),
            device=lambda pair: pair[0].device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        lora = self.param_groups[0]
        work = []  # per batch: both sides with their scaled gradients, before anything moves
        for pairs in self._batches():
            step = self.state[pairs[0][1]].get("step", 0) + 1
            active = 0 if step % 2 == 1 else 1  # block 1: B on odd steps, A on even ones
            work.append((_sides(pairs, pairs[0][2]), active, step))
        _scale_gradients([side for sides, _, _ in work for side in sides], lora["ridge"])
        # block 6 counts the active factor's projected gradient ‖g̃·R‖, and the other tensors' gradients
        norms_sq = [((on.g_tilde @ on.gram) * on.g_tilde).sum((-2, -1)).double()
                    for on in (sides[active] for sides, active, _ in work)]
        others = [p for g in self.param_groups[1:] for p in g["params"] if p.grad is not None]
        if others:
            norms = torch._foreach_norm([p.grad for p in others], 2, dtype=torch.float64)
            norms_sq.append(torch.stack([n.to(norms[0].device) for n in norms]).square())
        coef = self._grad_norm = None  # coef: the clipping factor, a tensor; None: no clipping
        if norms_sq:
            device = norms_sq[0].device
            self._grad_norm = torch.cat([n.to(device) for n in norms_sq]).sum().sqrt()
            if lora["max_grad_norm"] > 0:
                coef = (lora["max_grad_norm"] / (self._grad_norm + 1e-6)).clamp_(max=1.0)

        for sides, active, step in work:
            for i, side in enumerate(sides):
                self._side_step(lora, side, step, i == active, None if coef is None else coef.to(side.g.device))
        for group in self.param_groups[1:]:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if coef is not None and grads:
                grads = torch._foreach_mul(grads, coef.to(grads[0].device))
            adamw_(params, grads, [self.state[p] for p in params], group["lr"], group["betas"], group["eps"],
                   group["weight_decay"])
        self._stacked.forget_unused()
        return loss

    def _side_step(self, group, side: _Side, step: int, active: bool, coef) -> None:
        beta1, beta2 = group["betas"]
        simple = group["simple"]
        G, p, r = side.g.shape
        k, l, weight = _packed(r, side.g.device)
        names = ("exp_avg", "exp_avg_sq" if simple else "row_sq", "partner_prev")
        states = [self.state[param] for param in side.params]
        needed, fresh = set(names), 0
        for i, state in enumerate(states):
            if not state.keys() >= needed:  # first step only: per-matrix state, then stacked
                fresh += 1
                state["exp_avg"] = side.g.new_zeros(p, r)
                state[names[1]] = side.g.new_zeros(p, r if simple else k.numel())
                state["partner_prev"] = side.R[i].clone(memory_format=torch.contiguous_format)
            state["step"] = step
        stacked = self._stacked.link(side.params, states, names)
        m, second, prev = (stacked[name] for name in names)
        # blocks 3-4: re-express the moments in the partner's new basis, C = (R_old Rᵀ)(R Rᵀ + δI)⁻¹,
        # for the pairs whose partner changed since the moments were accumulated; the others get C = I
        # exactly. The mask stays on the device; only a CPU, where reading it costs no wait, skips
        # the work for a batch with no change (the inactive factor's, unless something else moved it).
        changed = None if fresh == G else (prev != side.R).flatten(1).any(1)  # new: prev is R itself
        if changed is not None and side.R.device.type == "cpu" and not changed.any():
            changed = None
        if changed is not None:
            C = torch.where(changed[:, None, None], (prev @ side.R.mT) @ side.inverse, _eye(r, m.dtype, m.device))
            m = self._stacked.replace(side.params, states, names, "exp_avg", m @ C)
            if not simple:
                K = congruence(C.transpose(0, 1), k, l).transpose(0, 1)  # P ← Cᵀ P C, packed
                second = self._stacked.replace(side.params, states, names, names[1], second @ K)
            self._stacked.replace(side.params, states, names, "partner_prev",
                                  side.R.contiguous())  # a fresh stack: nothing else writes to it
        g_tilde = side.g_tilde if coef is None else side.g_tilde * coef
        m.mul_(beta1).add_(g_tilde, alpha=1 - beta1)
        if simple:
            second.mul_(beta2).addcmul_(g_tilde, g_tilde, value=1 - beta2)
        else:
            second.mul_(beta2).add_(packed_outer(g_tilde, k, l), alpha=1 - beta2)
        if not active:
            return
        lr, eps = group["lr"], group["eps"]
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        if simple:
            direction = m / (second / bc2).sqrt_().add_(eps)
        else:
            # block 5: Adam direction in W's space, D = (m·R) ⊘ (sqrt(V̂/bc2) + ε), projected back
            D = m @ side.R
            V = (second @ quad_basis(side.R, k, l, weight)).clamp_(min=0)
            D.div_(V.div_(bc2).sqrt_().add_(eps))
            direction = (D @ side.R.mT) @ side.inverse
            del D, V
        if side.transposed:
            direction = direction.mT
        if group["weight_decay"]:
            torch._foreach_mul_(side.params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(side.params, list(direction.unbind(0)), alpha=-lr / bc1 * side.unit)


# ---- the recipe's registry entry -----------------------------------------------------------------
@dataclass(frozen=True)
class LoFTOptions:
    """optimizer_args; unset ones take LoFT's defaults (max_grad_norm: the run's clip)."""

    simple: bool | None = None
    ridge: float | None = None
    eps: float | None = None
    max_grad_norm: float | None = None

    def __post_init__(self):
        check(self, "optimizer_args.", {"simple": BOOL, "ridge": FINITE_NON_NEGATIVE, "eps": FINITE_NON_NEGATIVE,
                                        "max_grad_norm": FINITE_NON_NEGATIVE})


def _build(model: torch.nn.Module, spec: OptimizerSpec) -> LoFT:
    args = {"max_grad_norm": spec.clip, **set_fields(spec.options)}  # the run's clip, on projected gradients
    return LoFT.from_peft_model(model, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, **args)


# LoFT pairs PEFT LoRA factors (A, B) and needs W = W0 + s·B·A exactly (not DoRA's, not LoRA-FA's frozen A)
register("loft", _build, LoFTOptions, updates=("lora",), needs="LoRA factors (W = W0 + s·B·A)",
         clips_gradients=True)
