"""Reject a config that cannot work, with a one-line reason, before any weights load; hand on what was
resolved on the way (a Plan), so nothing downstream parses or checks an option again."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rankwise.config import Config, ConfigError
from rankwise.data import check_data
from rankwise.hooks import HookEntry, check_hooks
from rankwise.methods import Method, MethodSpec, get_method
from rankwise.models import check_model
from rankwise.optim import OptimizerEntry, OptimizerSpec, get_optimizer
from rankwise.train.dist import check_parallel
from rankwise.train.metrics import check_report_to
from rankwise.train.schedule import SCHEDULES

PRECISIONS = ("bf16", "fp32")
MAX_BATCH = 1 << 16  # sequences; far beyond any memory, and it keeps index lists small
MAX_THREADS = 1024  # torch.set_num_threads with absurd counts crashes the process


@dataclass(frozen=True)
class Plan:
    """A validated run: the config, and every part of it parsed into the object its owner uses."""

    cfg: Config
    method: Method
    method_spec: MethodSpec
    optimizer: OptimizerEntry
    optimizer_spec: OptimizerSpec
    hooks: list[tuple[HookEntry, object]] = field(default_factory=list)  # enabled hooks and their options
    resume_from: Path | None = None  # the checkpoint directory `resume` named
    resume_step: int | None = None  # its step (metrics.jsonl is cut after it)


def validate(cfg: Config) -> Plan:
    """The Plan for `cfg`, or ConfigError with a one-line reason; reads files, never loads weights."""
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "max_length": cfg.max_length, "eval_examples": cfg.eval_examples}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    for key in ("warmup_steps", "eval_every", "save_every", "threads", "weight_decay", "clip", "eval_generate",
                "validation_examples"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"betas must lie in [0, 1), got {cfg.betas}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {cfg.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    for key in ("batch_size", "grad_accum"):
        if getattr(cfg, key) > MAX_BATCH:
            raise ConfigError(f"{key}={getattr(cfg, key)} is more than {MAX_BATCH}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must lie in [0, 2**32), got {cfg.seed}")
    if cfg.threads > MAX_THREADS:
        raise ConfigError(f"threads={cfg.threads} is more than {MAX_THREADS}; 0 leaves torch's default")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"unknown device {cfg.device!r}; choose auto, cpu, cuda or cuda:N")
    method = get_method(cfg.method)
    method_spec = method.spec(cfg)
    optimizer = get_optimizer(cfg.optimizer)
    optimizer_spec = optimizer.check(cfg)
    hooks = check_hooks(cfg)
    check_parallel(cfg, method, optimizer)
    check_report_to(cfg.report_to)
    try:
        check_model(cfg.model)
        check_data(cfg.data)
        _check_out(cfg)
        resume_from, resume_step = _check_resume(cfg)
    except OSError as e:  # e.g. a file name too long for the file system
        raise ConfigError(f"cannot use the path {e.filename or ''}: {e.strerror or e}") from None
    return Plan(cfg, method, method_spec, optimizer, optimizer_spec, hooks, resume_from, resume_step)


# what a resumed run must share with the checkpoint, or it would train something else or silently keep
# the old value (the scheduler restores its LR, the stream its seed)
RESUME_KEYS = ("model", "data", "max_length", "method", "rank", "alpha", "dropout", "target_modules",
               "method_args", "optimizer", "optimizer_args", "lr", "weight_decay", "betas", "schedule",
               "warmup_steps", "seed", "fast_forward", "ff")


def _check_resume(cfg: Config) -> tuple[Path | None, int | None]:
    """The checkpoint directory and step a resume starts from (None, None for a fresh run)."""
    if cfg.resume is None:
        return None, None
    from rankwise.train import checkpoint as ckpt

    try:
        where = ckpt.resolve(cfg.resume, Path(cfg.out))
    except FileNotFoundError as e:
        raise ConfigError(f"resume={cfg.resume}: {e}") from None
    try:
        meta = ckpt.read_meta(where)
    except (OSError, ValueError) as e:
        meta = e
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict) \
            or not isinstance(meta.get("step"), int):
        raise ConfigError(f"resume={cfg.resume}: {where / ckpt.META} is damaged; resume from an earlier "
                          f"checkpoint (resume={where.parent}/step-N)")
    saved = meta.get("config", {})
    mine = json.loads(json.dumps(cfg.to_dict()))
    changed = [k for k in RESUME_KEYS if k in saved and _same_path(saved[k]) != _same_path(mine[k])]
    if changed:
        pairs = ", ".join(f"{k}={saved[k]!r} (now {mine[k]!r})" for k in changed)
        raise ConfigError(f"resume={cfg.resume}: the checkpoint was trained with {pairs}; resume with the same "
                          f"settings, or start a new run")
    return where, meta["step"]


def _same_path(value):
    """Paths compare by what they point at; other values as they are."""
    if isinstance(value, str) and ("/" in value or value.startswith(".")) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _check_out(cfg: Config) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={cfg.out} exists and is not a directory")
    has_run = (out / "latest").is_file() or (out / "metrics.jsonl").is_file()
    if cfg.resume is None and has_run and not cfg.overwrite:
        raise ConfigError(f"out={cfg.out} already holds a run: pass resume=latest to continue it, "
                          f"overwrite=true to start over, or choose another out=")
    if cfg.resume is not None and cfg.overwrite:
        raise ConfigError("resume and overwrite=true contradict each other: pick one")
    from rankwise.train.checkpoint import probe_write

    # write a probe in out, or in the nearest folder that would hold it: a full disk or a read-only place
    # is found now, not after the weights load (and root passes every permission check but this one)
    here = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not here.is_dir():
        raise ConfigError(f"out={cfg.out} cannot be created: {here} is not a directory")
    try:
        probe_write(here)
    except OSError as e:
        raise ConfigError(f"out={cfg.out} is not writable: {e.strerror or e} (in {here})") from None
