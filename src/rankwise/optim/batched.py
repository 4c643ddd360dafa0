"""Shared machinery for optimizers that step many same-shape matrices with one batched op each.

A model's adapted matrices come in a handful of shapes (q, k, v, o, gate, up, down), each repeated once
per layer. Stepping them one by one costs a few dozen small kernels per matrix; stacking each shape's
matrices along a leading batch dimension costs the same few dozen kernels per *shape*.

`batches` sorts items into such same-shape batches (capped in size, so the batch's transient p×q
tensors stay bounded on large models). `StackedState` keeps the per-parameter optimizer state
(torch.optim's `state[p]`, what `state_dict()` saves) as views [i] of one stacked tensor per state key,
so a batch reads and writes its state in place, with no stacking or copying back per step.
`adamw_` is AdamW over a list of tensors with torch's multi-tensor (`_foreach`) ops.
"""
from __future__ import annotations

import operator
from typing import Callable, Hashable, Iterable, Sequence

import torch

# most elements of one batch's largest transient (G·p·q): 2**24 fp32 values are 64 MiB
MAX_BATCH_ELEMENTS = 2 ** 24
# a CPU gains nothing from fewer, larger ops (it is bound by memory traffic, not by launches), and large
# transients cost it page faults on every step (allocations past glibc's mmap threshold): batches there
# stay small, so large matrices are stepped one at a time and small ones (k, v) still share a batch
CPU_BATCH_ELEMENTS = 2 ** 20


def batch_limit(device: torch.device) -> int:
    """Most elements of one batch's largest transient on `device`."""
    return min(MAX_BATCH_ELEMENTS, CPU_BATCH_ELEMENTS) if device.type == "cpu" else MAX_BATCH_ELEMENTS


def batches(items: Iterable, key: Callable[[object], Hashable], size: Callable[[object], int],
            device: Callable[[object], torch.device]) -> list[list]:
    """Items grouped by key (first-seen order, stable inside a group), each group cut into runs whose
    summed size stays within the batch limit of the items' device (a run holds at least one item)."""
    groups: dict[Hashable, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    out = []
    for members in groups.values():
        run = max(1, batch_limit(device(members[0])) // max(1, size(members[0])))
        out += [members[i:i + run] for i in range(0, len(members), run)]
    return out


class StackedState:
    """Per-parameter state tensors that are views [i] of one stacked (G, ...) tensor per state key.

    `link` hands back the stacked tensors of a batch of parameters, given their state dicts (torch.optim's
    `state[p]`, in batch order); in-place ops on them update every parameter's state. If the state no
    longer consists of this batch's views (first use, after load_state_dict, a batch whose membership
    changed), it is stacked again from whatever per-parameter tensors the state now holds: the stacked
    tensor is a copy, and the state is re-pointed at its views. `replace` swaps in a new stacked tensor
    (an out-of-place result) and re-points the state at it.
    """

    def __init__(self):
        self._links: dict[tuple, dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]]] = {}
        self._used: set[tuple] = set()

    def link(self, params: Sequence[torch.Tensor], states: Sequence[dict], names: Sequence[str]) -> dict[str, torch.Tensor]:
        key = (tuple(map(id, params)), tuple(names))
        self._used.add(key)
        linked = self._links.get(key)
        if linked is not None and all(all(map(operator.is_, (st.get(name) for st in states), views))
                                      for name, (_, views) in linked.items()):
            return {name: stacked for name, (stacked, _) in linked.items()}
        stacked = {name: torch.stack([st[name] for st in states]) for name in names}
        self._links[key] = {}
        for name, tensor in stacked.items():
            self._point(states, key, name, tensor)
        return stacked

    def replace(self, params: Sequence[torch.Tensor], states: Sequence[dict], names: Sequence[str], name: str,
                tensor: torch.Tensor) -> torch.Tensor:
        """Make `tensor` (G, ...) the stacked state `name` of this batch (linked before with `names`)."""
        self._point(states, (tuple(map(id, params)), tuple(names)), name, tensor)
        return tensor

    def _point(self, states, key, name, tensor) -> None:
        views = tensor.unbind(0)
        for st, view in zip(states, views):
            st[name] = view
        self._links[key][name] = (tensor, views)

    def forget_unused(self) -> None:
        """Drop the links no batch asked for since the last call (call once per optimizer step)."""
        self._links = {k: v for k, v in self._links.items() if k in self._used}
        self._used = set()


def adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], lr: float,
           betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """AdamW with decoupled decay over many tensors, `_foreach` ops throughout.

    Moments are created like the gradients (so fp32 gradients of bf16 weights give fp32 moments);
    `step` is an int per tensor, as in the per-tensor loops this replaces. Tensors whose step counts
    differ (one skipped a step) are stepped in separate runs, each with its own bias corrections.
    """
    if not params:
        return
    beta1, beta2 = betas
    runs: dict[int, list[int]] = {}
    for i, (g, state) in enumerate(zip(grads, states)):
        if "exp_avg" not in state:  # first step only
            state.update(step=0, exp_avg=torch.zeros_like(g), exp_avg_sq=torch.zeros_like(g))
        state["step"] += 1
        runs.setdefault(state["step"], []).append(i)
    for step, members in runs.items():
        ps = [params[i] for i in members]
        gs = [grads[i] for i in members]
        m = [states[i]["exp_avg"] for i in members]
        v = [states[i]["exp_avg_sq"] for i in members]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, gs, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, gs, gs, value=1 - beta2)
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = torch._foreach_div(v, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        if weight_decay:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        if all(p.dtype == mi.dtype for p, mi in zip(ps, m)):
            torch._foreach_addcdiv_(ps, m, denom, value=-lr / bc1)
        else:  # e.g. bf16 weights with fp32 moments: form the update in fp32, round it once
            update = torch._foreach_div(m, denom)
            torch._foreach_add_(ps, [u.to(p.dtype) for u, p in zip(update, ps)], alpha=-lr / bc1)
