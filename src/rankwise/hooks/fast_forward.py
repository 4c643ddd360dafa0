"""Fast Forward in the recipe: `rankwise train fast_forward=true ff.interval=6 ...`.

Every stage's tiny-set forwards (measured FLOPs), weight moves (2 FLOPs per parameter) and wall time,
snapshots included, are charged to the run, so cum_flops / cum_seconds compare honestly with a plain run.
Each stage is logged as {"kind": "ff", "accepted", "loss_before", "loss_after", "evals", ...}.
With ff.eval_cost unset, the cost of one evaluation in optimizer steps is measured (its FLOPs over the
last step's), and a stage that accepts fewer FF steps than its evaluations cost stretches the interval.
"""
from __future__ import annotations

import time

from rankwise.fastforward.core import FastForward, FFOptions
from rankwise.fastforward.evaluate import tiny_loss_sum, tiny_subset
from rankwise.hooks import StepHook, register
from rankwise.train import dist
from rankwise.train.flops import flop_size

NAME = "fast_forward"


class FastForwardHook(StepHook):
    name = NAME

    def __init__(self, options: FFOptions):
        self.options = options
        self.ff: FastForward | None = None
        self._pending: dict | None = None  # state loaded before the run started
        self._eval_flops = self._step_flops = 0.0

    def on_train_start(self, run) -> None:
        batches = tiny_subset(run.tiny_batches, self.options.tiny_examples)
        size = flop_size(batches)

        def tiny_loss():
            with run.flops.measure("tiny", size):
                value = tiny_loss_sum(run.scorer, batches, run.autocast)
            self._eval_flops += run.flops.last
            if self.options.eval_cost is None and self._step_flops > 0:  # measured: one evaluation in steps
                self.ff.eval_cost = run.flops.last / self._step_flops
            return value

        self.ff = FastForward(run.trainable(), tiny_loss, self.options)
        if self._pending:
            self.ff.load_state_dict(self._pending)
            self._pending = None

    def after_step(self, run) -> None:
        start = time.perf_counter()
        self._eval_flops = 0.0
        if self.options.eval_cost is None:  # measured: the optimizer step just taken, averaged over ranks
            # (their slices differ in length), so every rank derives the same cost and back-off decision
            self._step_flops = dist.sum_all(run.world, run.flops.last)[0] / run.world.size
        stage = self.ff.after_step()
        seconds = time.perf_counter() - start
        flops = self._eval_flops + (stage["move_flops"] if stage else 0.0)
        run.add_cost(flops, seconds)  # snapshots cost time too, stage or not
        if stage is not None:
            run.log({"kind": "ff", "accepted": stage["accepted"], "loss_before": stage["loss_before"],
                     "loss_after": stage["loss_after"], "evals": stage["evals"], "interval": stage["interval"],
                     "pays": stage["pays"], "eval_cost": self.ff.eval_cost,
                     "flops": flops, "seconds": seconds, "points": stage["points"]})

    def state_dict(self) -> dict:
        return self.ff.state_dict() if self.ff is not None else dict(self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.ff is not None:
            self.ff.load_state_dict(state)
        else:
            self._pending = state


# one switch: fast_forward=true; options under ff.* (FFOptions, checked once when parsed)
register(NAME, FastForwardHook, FFOptions, options_key="ff", switch="fast_forward")
