"""Why `rankwise.train.dist.shutdown` frees the model first: a gloo group still held at exit can abort.

Spawns `runs` two-process CPU jobs (gloo). Each wraps a small model in DDP (or FSDP2 with --fsdp), takes a
few backward steps and destroys the process group; with --free the wrapper is deleted and collected before
that. Counts the jobs whose processes died ("terminate called without an active exception").

    python scripts/gloo_exit_abort.py 40            # wrapper alive at exit: some jobs abort
    python scripts/gloo_exit_abort.py 40 --free     # wrapper freed first: none should
"""
from __future__ import annotations

import argparse
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(rank: int, world: int, port: int, fsdp: bool, free: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
    for _ in range(5):
        wrapped(torch.randn(4, 8)).sum().backward()
    if free:
        del wrapped
        gc.collect()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=int)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--free", action="store_true")
    args = ap.parse_args()
    died = 0
    for _ in range(args.runs):
        try:
            mp.spawn(job, args=(2, free_port(), args.fsdp, args.free), nprocs=2, join=True)
        except mp.ProcessExitedException:
            died += 1
    print(f"{'FSDP2' if args.fsdp else 'DDP'}, wrapper {'freed' if args.free else 'alive'}: "
          f"{died} of {args.runs} jobs aborted")


if __name__ == "__main__":
    main()
