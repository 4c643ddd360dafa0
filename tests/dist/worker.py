"""One rank of a test run under torchrun: `python -m torch.distributed.run ... worker.py key=value ...`.

Trains with the recipe, then writes this rank's trainable tensors (FSDP shards gathered) to
{out}/rank{r}.pt so a test can compare ranks and runs. `stop_at=N` (not a Config key) makes rank 0
alone ask to stop after step N, as if only it got SIGTERM: every rank must stop there and save.
"""
from __future__ import annotations

import sys

import torch

from rankwise.config import load_config
from rankwise.hooks import HOOKS, StepHook, register
from rankwise.train import dist
from rankwise.recipes.train import _loop, build_run


class StopAt(StepHook):
    name = "stop_at"

    def __init__(self, step: int):
        self.at = step

    def after_step(self, run) -> None:
        if run.step == self.at and run.world.rank == 0:
            run.stop_reason = "test stop on rank 0"


def main(argv: list[str]) -> None:
    stop_at = [int(a.split("=", 1)[1]) for a in argv if a.startswith("stop_at=")]
    overrides = [a for a in argv if not a.startswith("stop_at=")]
    if stop_at and "stop_at" not in HOOKS:
        register("stop_at", lambda cfg: StopAt(stop_at[0]))
        overrides.append("hooks=[stop_at]")
    cfg = load_config(None, overrides)
    run = build_run(cfg, say=print)
    summary = _loop(run, say=print)
    from torch.distributed.tensor import DTensor

    tensors = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
               for n, p in run.model.named_parameters() if p.requires_grad}
    torch.save({"tensors": tensors, "summary": summary, "world": run.world.size},
               f"{cfg.out}/rank{run.world.rank}.pt")
    if run.log_file is not None:
        run.log_file.close()
    world = run.world
    del run  # as the recipe does: nothing may hold the process group when it is destroyed
    dist.shutdown(world)


if __name__ == "__main__":
    main(sys.argv[1:])
