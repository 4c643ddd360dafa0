"""Fast Forward (Rahamim et al., EMNLP 2024): extrapolate the optimizer's own direction while it pays.

Every `interval` optimizer steps a stage runs: with W_t the trainable tensors and d a direction (the
last optimizer step, W_t - W_{t-1}, or the mean step over the interval), it searches the line
W_t + s * d (s in units of optimizer steps) for the lowest loss on a tiny held-out set, moves there,
and leaves the optimizer's state alone. Each tensor moves on its own (for LoRA: A and B separately,
so the product BA moves quadratically in s).

What differs from the reference code, and why:
- L(W_t) is measured first and a point is kept only if it is strictly better (no free first step);
- the stage always ends at the best point it evaluated (the reference kept the one that got worse);
- s is capped; the default search doubles s = 1, 2, 4, ... to bracket the minimum and refines the
  bracket with a parabola (or golden section): O(log s) tiny-set forwards instead of O(s);
- a stage that does not pay stretches the interval (x `backoff`), so FF costs little when idle; it pays
  when it accepts more FF steps than its evaluations cost in optimizer steps (`eval_cost`, measured).
The reference search stays available as `search="reference"` for comparison.

The LR schedule is not touched: it is indexed by optimizer steps, and FF steps are not optimizer steps.
The direction already carries the current LR (it is a step the optimizer took), so a decaying schedule
shrinks FF moves along with SGD moves.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from rankwise.fastforward.search import SEARCHES, REFINES, line_search

DIRECTIONS = ("step", "interval")


@dataclass
class FFOptions:
    interval: int = 6  # optimizer steps between stages (while stages pay)
    burn_in: int = 6  # optimizer steps before the first stage
    cap: float = 32.0  # the furthest a stage may go, in optimizer steps of the direction
    direction: str = "step"  # step: W_t - W_{t-1} (the paper) | interval: mean step since the last stage
    search: str = "doubling"  # doubling (bracket + refine) | linear (k=1,2,3.. + revert) | reference (paper)
    refine: str = "parabolic"  # parabolic | golden | none: how a doubling bracket is narrowed
    refine_evals: int = 1  # tiny-set evaluations spent narrowing the bracket
    warm_start: bool = True  # doubling starts near the previous stage's answer (fewer evaluations)
    backoff: float = 2.0  # interval multiplier after a stage that does not pay (1 = never back off)
    eval_cost: float | None = None  # one tiny-set evaluation in optimizer steps; None: measured by the recipe
    max_interval: int = 96  # the interval never stretches beyond this
    tiny_examples: int = 32  # tiny-set examples per evaluation (used by the recipe and the callback)

    def __post_init__(self):
        check_options(asdict(self))


OPTION_NAMES = tuple(f.name for f in fields(FFOptions))


def check_options(values: dict) -> None:
    """Raise ValueError with a one-line reason unless `values` are valid FF options."""
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown Fast Forward option(s) {unknown}; valid: {', '.join(OPTION_NAMES)}")

    def need(ok: bool, what: str):
        if not ok:
            raise ValueError(what)

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v):  # finite as a float: nan, inf and ints too big for a float fail
        return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max

    v = values
    for key in ("interval", "tiny_examples", "max_interval"):
        if key in v:
            need(integer(v[key]) and v[key] >= 1, f"ff.{key} must be an integer >= 1, got {v[key]!r}")
    for key in ("burn_in", "refine_evals"):
        if key in v:
            need(integer(v[key]) and v[key] >= 0, f"ff.{key} must be an integer >= 0, got {v[key]!r}")
    if v.get("eval_cost") is not None:
        need(number(v["eval_cost"]) and v["eval_cost"] >= 0, f"ff.eval_cost must be a number >= 0 or null, "
                                                              f"got {v['eval_cost']!r}")
    if "warm_start" in v:
        need(isinstance(v["warm_start"], bool), f"ff.warm_start must be true or false, got {v['warm_start']!r}")
    if "cap" in v:
        need(number(v["cap"]) and v["cap"] >= 1, f"ff.cap must be a number >= 1, got {v['cap']!r}")
    if "backoff" in v:
        need(number(v["backoff"]) and v["backoff"] >= 1, f"ff.backoff must be a number >= 1, got {v['backoff']!r}")
    if "direction" in v:
        need(v["direction"] in DIRECTIONS, f"ff.direction must be one of {', '.join(DIRECTIONS)}, got {v['direction']!r}")
    if "search" in v:
        need(v["search"] in SEARCHES, f"ff.search must be one of {', '.join(SEARCHES)}, got {v['search']!r}")
    if "refine" in v:
        need(v["refine"] in REFINES, f"ff.refine must be one of {', '.join(REFINES)}, got {v['refine']!r}")
    if "interval" in v and "max_interval" in v:
        need(v["max_interval"] >= v["interval"], f"ff.max_interval ({v['max_interval']}) must be >= ff.interval "
                                                 f"({v['interval']})")


def _all_reduce_mean(value) -> float:
    """The mean loss over ranks, so that every rank takes the same decision.

    `value` is a float (a rank's mean) or a pair (loss_sum, count) for token-weighted means of shards.
    """
    total, count = value if isinstance(value, tuple) else (float(value), 1.0)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(total) / max(float(count), 1e-12)
    # float64 and one collective: every rank receives the same bits
    t = torch.tensor([float(total), float(count)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t[0]) / max(float(t[1]), 1e-12)


class FastForward:
    """Fast Forward stages for any PyTorch loop. Call `after_step()` after each optimizer step.

    params: the trainable tensors (the adapter's, or all of them for full fine-tuning).
    tiny_loss: returns the tiny-set loss at the current weights (a float, or (sum, count)); it should
        run without autograd; under torch.distributed it is averaged over ranks here.
    Returns from `after_step()` a stage record (dict) when a stage ran, else None.
    """

    def __init__(self, params, tiny_loss: Callable[[], float | tuple[float, float]],
                 options: FFOptions | dict | None = None):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("Fast Forward needs at least one trainable tensor")
        self.tiny_loss = tiny_loss
        self.options = options if isinstance(options, FFOptions) else FFOptions(**(options or {}))
        o = self.options
        self.step = 0  # optimizer steps seen
        self.interval = o.interval  # current interval (stretched by back-off)
        self.next_stage = max(1, o.burn_in)  # the optimizer step after which the next stage runs
        self.snapshot: list[torch.Tensor] | None = None  # W at `snapshot_step`, for the direction
        self.snapshot_step = 0
        self.stages = self.empty_stages = self.evals = 0
        self.ff_steps = 0.0  # sum of accepted s over all stages
        self.last_accepted = 0.0  # the previous stage's answer, where a warm-started search begins
        # a stage pays when it accepts more FF steps than its evaluations cost in optimizer steps
        self.eval_cost = self.options.eval_cost or 0.0

    # ---- the loop calls this ----------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> dict | None:
        self.step += 1
        o = self.options
        if self.step == self.next_stage:
            if self.snapshot is None:  # e.g. burn_in <= 1: no direction yet, try again next step
                self.next_stage += 1
                self._take_snapshot()
                return None
            record = self._stage()
            if o.direction == "interval" or self.next_stage == self.step + 1:
                self._take_snapshot()  # the next direction starts where this stage ended
            return record
        if o.direction == "step" and self.step == self.next_stage - 1:
            self._take_snapshot()  # W_{t-1}, for d = W_t - W_{t-1}
        elif o.direction == "interval" and self.snapshot is None:
            self._take_snapshot()
        return None

    # ---- one stage -----------------------------------------------------------------------------
    def _take_snapshot(self) -> None:
        self.snapshot = [p.detach().clone() for p in self.params]
        self.snapshot_step = self.step

    def _stage(self) -> dict:
        o = self.options
        span = self.step - self.snapshot_step  # optimizer steps the direction covers
        origin = [p.detach().clone() for p in self.params]
        # d = (W_t - W_snapshot) / span: one mean optimizer step; reuse the snapshot's memory
        direction = self.snapshot
        for d, w in zip(direction, origin):
            d.neg_().add_(w).div_(span)
        self.snapshot = None

        def move_to(s: float) -> None:
            for p, w, d in zip(self.params, origin, direction):
                torch.add(w, d, alpha=s, out=p.data) if s else p.data.copy_(w)

        def loss_at(s: float) -> float:
            move_to(s)
            return _all_reduce_mean(self.tiny_loss())

        start = 2.0 ** math.floor(math.log2(self.last_accepted)) if o.warm_start and self.last_accepted >= 1 else 1.0
        result = line_search(loss_at, o.search, o.cap, o.refine, o.refine_evals, start)
        move_to(result.kept_s)  # the best point (the reference search keeps its last one)
        accepted = result.kept_s
        self.stages += 1
        self.evals += result.evals
        self.ff_steps += accepted
        self.last_accepted = accepted
        pays = accepted > result.evals * self.eval_cost  # optimistic: an FF step counted as a full step
        if accepted == 0:
            self.empty_stages += 1
        if not pays:
            self.interval = min(o.max_interval, max(self.interval + 1, math.ceil(self.interval * o.backoff))) \
                if o.backoff > 1 else self.interval
        else:
            self.interval = o.interval
        self.next_stage = self.step + self.interval
        n_params = sum(p.numel() for p in self.params)
        return {"accepted": accepted, "loss_before": result.loss_before, "loss_after": result.loss_after,
                "evals": result.evals, "points": result.points, "interval": self.interval, "pays": pays,
                "span": span, "move_flops": 2.0 * n_params * result.moves}

    # ---- exact resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "interval": self.interval, "next_stage": self.next_stage,
                "snapshot": None if self.snapshot is None else [_local(t).cpu().clone() for t in self.snapshot],
                "snapshot_step": self.snapshot_step, "stages": self.stages, "empty_stages": self.empty_stages,
                "evals": self.evals, "ff_steps": self.ff_steps, "last_accepted": self.last_accepted,
                "eval_cost": self.eval_cost,
                "options": asdict(self.options)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "interval", "next_stage", "snapshot_step", "stages", "empty_stages", "evals",
                    "ff_steps", "last_accepted", "eval_cost"):
            setattr(self, key, state[key])
        snap = state["snapshot"]
        self.snapshot = None if snap is None else [
            _like(s, p) for s, p in zip(snap, self.params)]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of an FSDP DTensor (state is saved per rank)."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach()


def _like(saved: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`saved` (a local shard or a whole tensor) as a tensor like parameter `p`, sharded if `p` is."""
    saved = saved.to(device=p.device, dtype=p.dtype).clone()
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(saved, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return saved
