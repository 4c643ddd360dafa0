"""Scale-out on torch.distributed: one process per device, started by torchrun.

    torchrun --nproc_per_node N -m rankwise train ...    or    rankwise train nproc=N ...

`rankwise train nproc=N` re-launches itself under torchrun (`python -m torch.distributed.run`); there
is no launcher of our own.

    ddp   every process holds the whole model; DistributedDataParallel all-reduces the gradients.
    fsdp  FSDP2 (`fully_shard`) per decoder layer and at the root: weights, gradients and optimizer
          state are sharded, gathered layer by layer for compute.

Data: every optimizer step draws `batch_size x world` examples per micro-batch from one seeded stream
and process r keeps slice r, so N processes see exactly what one process with batch_size x N sees.
The loss is the token-weighted mean over the whole global batch (counts are all-reduced first), so an
N-process run follows the 1-process run with the same global batch. Only rank 0 writes; every decision
(Fast Forward, NaN stop, signals) is taken from all-reduced numbers, so all ranks agree.
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rankwise.config import Config, ConfigError

PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parallel: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1 and self.parallel == "fsdp"


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def check_parallel(cfg: Config, method, optimizer) -> None:
    """Refuse a scale-out setting that cannot work, before any weights load. `method` and `optimizer` are
    the registry entries; each says for itself whether it runs on FSDP2's sharded DTensor parameters
    (`.fsdp`), and only what was tested there says yes."""
    if cfg.parallel not in PARALLEL:
        raise ConfigError(f"unknown parallel {cfg.parallel!r}; choose one of: {', '.join(PARALLEL)}")
    if cfg.nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {cfg.nproc}")
    cores = os.cpu_count() or 1
    if cfg.nproc > 4 * cores and not cfg.device.startswith("cuda"):
        raise ConfigError(f"nproc={cfg.nproc} processes on {cores} CPU cores is too many; use at most {4 * cores}")
    if cfg.parallel == "fsdp":
        if not method.fsdp:
            raise ConfigError(f"parallel=fsdp does not support method {cfg.method!r} yet; use parallel=ddp")
        if cfg.compile:
            raise ConfigError("compile=true is not supported with parallel=fsdp yet; use parallel=ddp")
        if not optimizer.fsdp:
            raise ConfigError(f"parallel=fsdp does not support optimizer {cfg.optimizer!r} (it works on whole "
                              f"matrices); use parallel=ddp")
    if under_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if cfg.nproc > 1 and cfg.nproc != local:
            raise ConfigError(f"nproc={cfg.nproc} but torchrun started {local} processes per node; "
                              f"drop nproc= under torchrun")
    elif cfg.nproc > 1 and cfg.device.startswith("cuda") and torch.cuda.device_count() < cfg.nproc:
        raise ConfigError(f"nproc={cfg.nproc} but only {torch.cuda.device_count()} CUDA devices are visible")


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `rankwise <argv>` as `nproc` processes under torchrun on this machine; its exit code.

    SIGTERM is passed on to torchrun (which passes it to every rank: each saves and stops). Ctrl-C
    reaches the whole process group from the terminal already, so it is not sent twice."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "rankwise", *argv]
    child = subprocess.Popen(command)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def init(cfg: Config) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a 1-process World otherwise."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(parallel=cfg.parallel)
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, parallel=cfg.parallel)


def device_for(world: World, device: torch.device) -> torch.device:
    return torch.device("cuda", world.local_rank) if device.type == "cuda" else device


def sum_all(world: World, *values: float) -> list[float]:
    """Sum numbers over ranks (one all-reduce); identity in a single process."""
    if world.size == 1:
        return list(values)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(t)
    return t.tolist()


def any_all(world: World, flag: bool) -> bool:
    """True on every rank when it is true on any (e.g. one rank got SIGTERM)."""
    return sum_all(world, float(flag))[0] > 0


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def gather_objects(world: World, obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(world: World, obj):
    """Rank 0's `obj` on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(world: World) -> None:
    """Leave the process group. Drop every model, optimizer and DDP/FSDP wrapper first: whatever still holds
    the group when the interpreter exits takes gloo's threads down with it and aborts the process
    ("terminate called without an active exception"; scripts/gloo_exit_abort.py reproduces it)."""
    if world.size > 1 and dist.is_initialized():
        gc.collect()  # wrappers caught in reference cycles go now, not at interpreter exit
        dist.destroy_process_group()


# ---- wrapping and saving the model ------------------------------------------------------------------
def parallelize(model: torch.nn.Module, world: World, device: torch.device, compile: bool = False) -> torch.nn.Module:
    """The module the loop calls for losses: TokenLoss(model), under DDP or FSDP2 when world.size > 1.

    FSDP2 shards each decoder layer, then the root (embeddings, final norm, head); call before
    building the optimizer, which must see the sharded parameters."""
    from rankwise.train.loss import TokenLoss

    engine = TokenLoss(model, compile=compile)
    if world.size == 1:
        return engine
    if world.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        return fully_shard(engine)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(engine, device_ids=ids)


def _decoder_layers(model) -> list[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError("parallel=fsdp needs a decoder with `.layers` (Llama-like models)")
    return list(layers)


def unwrap(engine: torch.nn.Module) -> torch.nn.Module:
    """The TokenLoss inside DDP (which adds collectives to every forward); FSDP's must be called as is."""
    from torch.nn.parallel import DistributedDataParallel

    return engine.module if isinstance(engine, DistributedDataParallel) else engine


@contextlib.contextmanager
def grad_sync(engine: torch.nn.Module, world: World, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if world.size == 1 or sync:
        yield
    elif world.sharded:
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        with engine.no_sync():
            yield


def reshard(world: World, engine: torch.nn.Module) -> None:
    """Put every FSDP group back to its sharded state on every rank (a no-grad forward leaves the root
    gathered), so that what rank 0 alone does next (saving) cannot leave the ranks in different states."""
    if world.sharded:
        from torch.distributed.fsdp import FSDPModule

        for module in engine.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@contextlib.contextmanager
def full_weights(world: World, model: torch.nn.Module):
    """Inside, rank 0's `model` holds plain full tensors where FSDP keeps shards, so a method's own
    `save` works unchanged; every rank must enter (the gathers are collectives)."""
    if not world.sharded:
        yield
        return
    from torch.distributed.tensor import DTensor

    full, swapped = {}, []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in full:  # tied weights: one gather, one tensor
                    full[id(p)] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                if world.main:
                    swapped.append((module, name, p))
                    module._parameters[name] = full[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def optimizer_state(world: World, engine, optimizer) -> dict:
    """The optimizer's state to save: torch's own, or (FSDP) full tensors keyed by parameter name."""
    if not world.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(engine, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    return {FQN_FORMAT: full}


def load_optimizer_state(world: World, engine, optimizer, state: dict) -> None:
    if FQN_FORMAT not in state:
        if world.sharded:
            raise ValueError("this checkpoint was not written under parallel=fsdp; resume it with parallel=ddp")
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(engine, optimizer, optim_state_dict=state[FQN_FORMAT],
                             options=StateDictOptions(full_state_dict=True))


FQN_FORMAT = "full_state_by_name"
