"""LoRA-Pre: full-rank training whose Adam moments live in rank-r factors (arXiv 2602.24283).

Adam's EMA m <- b*m + (1-b)*g is one gradient step on 1/2||m - g||^2. LoRA-Pre keeps the momentum of
each p x q weight as m_B @ m_A (p x r times r x q) and moves each factor toward g every step with a
damped closed-form Newton step, the other factor held fixed (spec: shared/specs/lora-pre.md):
    m_B <- (1-gamma) m_B + gamma g m_A^T (m_A m_A^T + d I)^-1
    m_A <- (1-gamma) m_A + gamma (m_B^T m_B + d I)^-1 m_B^T g
With (1-gamma)^2 = beta the product decays at beta and the gradient enters with weight 1-beta (exactly,
when g lies in the factors' subspaces). The second moment regresses |g| so that v = (v_B v_A)^2 >= 0.
The damping d is delta times the mean eigenvalue of the Gram matrix it is added to (as LoFT's ridge), so
the factors track c*g exactly as they track g; an absolute delta swamped m_B^T m_B when |g| was small.

`LoRAPreAdam.for_model(model, rank=...)` picks the attention/MLP Linear weights for low-rank state and
leaves embeddings, head and norms to plain AdamW; `param_groups` with rank=0 are plain AdamW too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.optim import OptimizerSpec, closure_loss, register
from rankwise.options import NON_NEGATIVE, POSITIVE, POSITIVE_INT, check, one_of, set_fields
from rankwise.optim.batched import StackedState, adamw_, batches
from rankwise.optim.lowrank import low_rank_groups

__all__ = ["LoRAPreAdam", "advance_factors"]


def advance_factors(B: torch.Tensor, A: torch.Tensor, target: torch.Tensor, gamma: float, delta: float) -> None:
    """One damped Newton step of B (p x r), then of A (r x q) with the new B, toward B @ A ~= target, in
    place; then A's rows are re-orthonormalised with the product B @ A unchanged. Leading batch dimensions
    (G x p x r, G x r x q, G x p x q) step G independent factor pairs at once."""
    newton_step_B(B, A, target, gamma, delta)
    newton_step_A(B, A, target, gamma, delta)
    # B A = (B R^T)(Q^T) for A^T = Q R: the same product, but neither factor drifts ill-conditioned over
    # many steps (both Newton steps are invariant to this change of basis, up to the damping)
    Q, R = torch.linalg.qr(A.mT)
    B.copy_(B @ R.mT)
    A.copy_(Q.mT)


def newton_step_B(B, A, target, gamma: float, delta: float) -> None:
    """B <- (1-gamma) B + gamma target A^T (A A^T + d I)^-1, d = delta * mean eigenvalue of A A^T
    (A A^T is symmetric: solve, transpose)."""
    B.mul_(1 - gamma).add_(_damped_solve(A @ A.mT, A @ target.mT, delta).mT, alpha=gamma)


def newton_step_A(B, A, target, gamma: float, delta: float) -> None:
    """A <- (1-gamma) A + gamma (B^T B + d I)^-1 B^T target, d = delta * mean eigenvalue of B^T B."""
    A.mul_(1 - gamma).add_(_damped_solve(B.mT @ B, B.mT @ target, delta), alpha=gamma)


def _damped_solve(gram: torch.Tensor, rhs: torch.Tensor, delta: float) -> torch.Tensor:
    """(gram + d I)^-1 rhs with d = delta * trace(gram) / r per matrix of the batch, so that scaling the
    factors scales d with them; gram is overwritten. d is at least the smallest normal float: a zero Gram
    matrix (B at initialisation, a zero gradient) still solves, to zero, since its rhs is zero too."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    ridge = trace.mul_(delta / gram.shape[-1]).clamp_min_(torch.finfo(gram.dtype).tiny)
    gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
    # solve_ex: linalg.solve's error check would wait on an accelerator; gram + d I (d > 0) is positive definite
    return torch.linalg.solve_ex(gram, rhs).result


def _apply(params: list[torch.Tensor], update: torch.Tensor, group: dict, scale: float) -> None:
    """theta <- theta - lr (scale * update + wd * theta) for a batch: update is G x p x q, one row per
    parameter (decoupled weight decay, as in AdamW)."""
    if group["weight_decay"]:
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
    updates = update.unbind(0)
    if update.dtype != params[0].dtype:  # fp32 update of low-precision weights, rounded once
        updates = update.to(params[0].dtype).unbind(0)
    torch._foreach_add_(params, list(updates), alpha=-group["lr"] * scale)


def _low_rank(p: torch.Tensor, group: dict) -> bool:
    return group["rank"] > 0 and p.ndim == 2 and group["rank"] < min(p.shape)


class _LowRankOptimizer(torch.optim.Optimizer):
    """Shared parts: factor init, the low-rank/dense split per parameter, exact state_dict round trip."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._stacked = StackedState()  # the factors of same-shape weights, stacked

    @classmethod
    def for_model(cls, model: nn.Module, rank: int = 16, targets=None, rest: str = "adamw", **kwargs):
        """Low-rank state for the decoder blocks' Linear weights, AdamW for the rest (see low_rank_groups)."""
        return cls(low_rank_groups(model, rank, targets, rest), **kwargs)

    def _init_factors(self, p: torch.Tensor, group: dict, names: tuple[str, ...]) -> dict:
        rows, cols = p.shape
        r = group["rank"]
        state = {"step": 0}
        for name in names:  # B factors start at zero (so the first product is 0), A factors small random
            if name.endswith("B"):
                state[name] = torch.zeros(rows, r, device=p.device, dtype=torch.float32)
            else:
                state[name] = torch.randn(r, cols, device=p.device, dtype=torch.float32) * group["init_std"]
        return state

    # the factor names of this optimizer's state, in the order they are initialised
    factor_names: tuple[str, ...] = ()

    @torch.no_grad()
    def step(self, closure=None):
        """Low-rank weights are stepped in batches of the same shape, dtype, device and step count (each
        batch's factors stacked, see rankwise.optim.batched); the rest with multi-tensor AdamW."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            low = [p for p in live if _low_rank(p, group)]
            for p in low:  # first step: factors made in parameter order (so the random draws are too)
                if not self.state[p]:
                    self.state[p].update(self._init_factors(p, group, self.factor_names))
            for params in batches(low, key=lambda p: (tuple(p.shape), p.dtype, p.device, self.state[p]["step"]),
                                  size=lambda p: p.numel(), device=lambda p: p.device):
                states = [self.state[p] for p in params]
                step = states[0]["step"] + 1
                for state in states:
                    state["step"] = step
                factors = self._stacked.link(params, states, self.factor_names)
                grads = torch.stack([p.grad for p in params]).float()
                self._step_low_rank(params, grads, factors, group, step)
            dense = [p for p in live if not _low_rank(p, group)]
            adamw_(dense, [p.grad.float() for p in dense], [self.state[p] for p in dense], group["lr"],
                   group["betas"], group["eps"], group["weight_decay"])
        self._stacked.forget_unused()
        return loss

    def _step_low_rank(self, params: list[torch.Tensor], g: torch.Tensor, factors: dict, group: dict,
                       t: int) -> None:
        """Step a batch of same-shape weights: g is their G x p x q fp32 gradients, factors their stacked
        state (G x p x r, G x r x q; in-place changes are the state's), t the step number."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; the factors must stay fp32, bit for bit
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(p.device, copy=True)


class LoRAPreAdam(_LowRankOptimizer):
    """Adam whose first and second moments of 2-D weights are held as rank-r fp32 factors.

    Per adapted p x q weight the state is m_B, v_B (p x r) and m_A, v_A (r x q): 2 r (p + q) floats.
    Groups with rank=0, and non-2-D tensors, get plain AdamW. `scale` multiplies the low-rank update
    (GaLore's experiments use 0.25). beta2 ~ 0.95 is advised: (EMA|g|)^2 <= EMA(g^2) makes steps larger.
    `delta` damps each factor solve relative to its Gram matrix (mean eigenvalue), whatever the gradients' scale.
    """

    def __init__(self, params, lr: float = 1e-3, rank: int = 16, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, delta: float = 1e-6, scale: float = 1.0, init_std: float = 0.02):
        if lr < 0 or rank < 0 or delta <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid LoRAPreAdam settings: lr={lr} rank={rank} delta={delta} betas={betas}")
        defaults = dict(lr=lr, rank=rank, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        scale=scale, init_std=init_std)
        super().__init__(params, defaults)

    factor_names = ("m_B", "m_A", "v_B", "v_A")

    def _step_low_rank(self, params, g, factors, group, t) -> None:
        beta1, beta2 = group["betas"]
        gamma1 = 1 - math.sqrt(beta1)  # (1-gamma1)^2 = beta1: the product m_B m_A decays at beta1
        gamma2 = 1 - beta2 ** 0.25  # the |g| product decays at sqrt(beta2), its square at beta2
        m_B, m_A, v_B, v_A = (factors[name] for name in self.factor_names)
        # the current gradient enters at full rank; only the history is low rank (transient G x p x q)
        m = (m_B @ m_A).mul_(beta1).add_(g, alpha=1 - beta1)
        v = (v_B @ v_A).square_().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        advance_factors(m_B, m_A, g, gamma1, group["delta"])
        advance_factors(v_B, v_A, g.abs_(), gamma2, group["delta"])  # g is this step's own copy
        m.div_(1 - beta1 ** t)
        v.div_(1 - beta2 ** t)
        _apply(params, m.div_(v.sqrt_().add_(group["eps"])), group, group["scale"])


# ---- recipe registration: optimizer=lorapre -----------------------------------------------------
def _targets(v) -> bool:
    return isinstance(v, str) or isinstance(v, list) and all(isinstance(t, str) for t in v)


@dataclass(frozen=True)
class LoRAPreOptions:
    """optimizer_args of optimizer=lorapre; unset ones take the optimizer's defaults."""

    rank: int | None = None  # rank of the momentum factors (default: the run's rank)
    targets: str | list[str] | None = None  # which Linear weights get low-rank state (see low_rank_groups)
    rest: str = "adamw"  # the other trainable tensors: adamw | frozen
    delta: float | None = None
    scale: float | None = None
    eps: float | None = None
    init_std: float | None = None

    def __post_init__(self):
        check(self, "optimizer_args.", {
            "rank": POSITIVE_INT, "rest": one_of("adamw", "frozen"), "delta": POSITIVE, "eps": NON_NEGATIVE,
            "scale": POSITIVE, "init_std": POSITIVE,
            "targets": (_targets, "all-linear, comma-separated name fragments or a list of them")})


def low_rank_factory(cls):
    """The registry's factory for a _LowRankOptimizer class: low-rank state for the decoder's Linear
    weights (rank: optimizer_args.rank, else the run's), the run's lr, betas and weight decay."""

    def build(model: nn.Module, spec: OptimizerSpec):
        o = spec.options
        return cls.for_model(model, rank=o.rank or spec.rank, targets=o.targets, rest=o.rest, lr=spec.lr,
                             betas=spec.betas, weight_decay=spec.weight_decay,
                             **set_fields(o, skip=("rank", "targets", "rest")))

    return build


FULL_WEIGHTS = {"updates": ("full",), "needs": "the full weights", "uses_rank": True}  # low-rank state for W itself, not an adapter
register("lorapre", low_rank_factory(LoRAPreAdam), LoRAPreOptions, **FULL_WEIGHTS)
