"""Muon (torch.optim.Muon) on the 2-D matrices, AdamW on every other trainable tensor, as one optimizer.

optimizer=muon works with any method: the matrices are low_rank_groups' choice, i.e. the trainable
nn.Linear weights inside the decoder blocks (method=full: attention and MLP projections; LoRA, DoRA,
LoRA-FA: the adapter factors), never the embeddings or the head; norms, embeddings, head, DoRA's
magnitudes and biases get torch.optim.AdamW. Muon runs with adjust_lr_fn="match_rms_adamw"
(Moonlight's 0.2·sqrt(max(p, q)) factor gives the orthogonalised step AdamW's typical RMS), so the
run's one lr and one weight decay serve both parts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rankwise.optim import OptimizerSpec, closure_loss, register, trainable_parameters
from rankwise.optim.lowrank import low_rank_groups
from rankwise.options import BOOL, POSITIVE, check, is_int, is_number, set_fields

__all__ = ["MuonAdamW", "muon_matrices"]


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `matrices` and torch.optim.AdamW over `rest`, stepped together.

    `param_groups` are the two children's own group dicts (an LR scheduler's change reaches both);
    `state` reads through to theirs; `state_dict()` holds each child's, and `load_state_dict` restores
    both exactly. `muon_eps` is Muon's Newton-Schulz normaliser guard (None: torch's default)."""

    def __init__(self, matrices, rest, lr: float = 1e-3, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, muon_eps: float | None = None):
        matrices, rest = list(matrices), list(rest)
        self.parts: dict[str, torch.optim.Optimizer] = {}
        if matrices:
            extra = {} if muon_eps is None else {"eps": muon_eps}
            self.parts["muon"] = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                                  nesterov=nesterov, ns_steps=ns_steps,
                                                  adjust_lr_fn="match_rms_adamw", **extra)
        if rest:
            # fused on CUDA, foreach elsewhere: what optimizer=adamw uses for the same tensors
            fused = all(p.is_cuda and type(p.data) is torch.Tensor for p in rest)
            self.parts["adamw"] = torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay,
                                                    foreach=not fused, fused=fused or None)
        super().__init__(matrices + rest, {})  # hooks and step profiling; its own group is replaced below
        self._link()

    def _link(self) -> None:
        """Point param_groups and state at the children's (again after they load a state dict)."""
        self.param_groups = [g for opt in self.parts.values() for g in opt.param_groups]
        self.state = _ReadThrough([opt.state for opt in self.parts.values()])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for opt in self.parts.values():
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"this MuonAdamW has parts {sorted(self.parts)}, the state dict {sorted(state_dict)}")
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])
        self._link()


class _ReadThrough(Mapping):
    """The children's per-parameter states as one read-only mapping. (A ChainMap would not do: looking a
    parameter up in a child that lacks it would add it there, torch's states being defaultdicts.)"""

    def __init__(self, states: list[dict]):
        self.states = states

    def __getitem__(self, param):
        for state in self.states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self):
        for state in self.states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable weights Muon steps: low_rank_groups' choice, or none (e.g. a method training norms)."""
    try:
        return low_rank_groups(model, 1)[0]["params"]
    except ValueError:  # no trainable Linear weight in the decoder blocks
        return []


@dataclass(frozen=True)
class MuonOptions:
    """optimizer_args of optimizer=muon (unset: torch.optim.Muon's defaults: 0.95, true, 5, 1e-7)."""

    momentum: float | None = None
    nesterov: bool | None = None
    ns_steps: int | None = None  # Newton-Schulz iterations
    eps: float | None = None  # Muon's guard when normalising the momentum before Newton-Schulz

    def __post_init__(self):
        check(self, "optimizer_args.", {
            "momentum": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"), "nesterov": BOOL,
            "ns_steps": (lambda v: is_int(v) and 1 <= v < 100, "an integer in [1, 99]"),  # torch refuses >= 100
            "eps": POSITIVE})


def _build(model, spec: OptimizerSpec) -> MuonAdamW:
    matrices = muon_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in trainable_parameters(model) if id(p) not in chosen]
    kwargs = set_fields(spec.options, skip=("eps",))
    return MuonAdamW(matrices, rest, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                     muon_eps=spec.options.eps, **kwargs)


register("muon", _build, MuonOptions)
