"""Reject a config that cannot work, with a one-line reason, before any weights load."""
from __future__ import annotations

from pathlib import Path

from rankwise.config import Config, ConfigError
from rankwise.data import check_data
from rankwise.methods import get_method
from rankwise.models import check_model
from rankwise.optim import get_optimizer
from rankwise.hooks import check_hooks
from rankwise.train.dist import check_parallel
from rankwise.train.schedule import SCHEDULES

PRECISIONS = ("bf16", "fp32")


def validate(cfg: Config) -> None:
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "max_length": cfg.max_length, "eval_examples": cfg.eval_examples}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    for key in ("warmup_steps", "eval_every", "save_every", "threads", "weight_decay", "clip"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"betas must lie in [0, 1), got {cfg.betas}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {cfg.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    get_method(cfg.method).check(cfg)
    get_optimizer(cfg.optimizer).check(cfg)
    check_hooks(cfg)
    check_parallel(cfg)
    check_model(cfg.model)
    check_data(cfg.data)
    _check_out(cfg)


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
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"unknown device {cfg.device!r}; choose auto, cpu or cuda")
    if cfg.resume is not None:
        where = out if cfg.resume == "latest" else Path(cfg.resume)
        if not where.exists():
            raise ConfigError(f"nothing to resume at {where}")
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
