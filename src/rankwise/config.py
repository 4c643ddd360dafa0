"""Run configuration: one dataclass, filled from a YAML file and `key=value` overrides.

Validation is pure: it reads the config and the file system but never loads weights, so a bad
run is refused in well under a second with a one-line reason.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BUILTIN_DATA = "stdlib-docstrings"
DEFAULT_MODEL = "default"


class ConfigError(ValueError):
    """A configuration that cannot work; the message is one line a user can act on."""


@dataclass
class Config:
    # what to train
    model: str = DEFAULT_MODEL  # "default" (embedded SmolLM2-135M-Instruct) or a local HF model directory
    data: str = BUILTIN_DATA  # built-in dataset name, a .jsonl file, or a local `datasets` directory
    max_length: int = 256  # tokens per example; longer examples are dropped, not truncated
    # how: an adapter method and an optimizer, both looked up in registries
    method: str = "lora"  # see rankwise.methods.METHODS
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    method_args: dict = field(default_factory=dict)  # extra options a method declares for itself
    optimizer: str = "adamw"  # see rankwise.optim.OPTIMIZERS
    optimizer_args: dict = field(default_factory=dict)
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # constant | cosine (both with linear warmup)
    warmup_steps: int = 4
    # the loop
    steps: int = 40  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    packing: bool = False  # pack each micro-batch's examples into fewer rows of max_length tokens (same examples, less padding)
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_every: int = 10  # optimizer steps between held-out evaluations; 0 = start and end only
    eval_examples: int = 64  # held-out test examples used for evaluation
    validation_examples: int = 0  # validation examples scored at the end (settings are chosen on these, not on test); 0 = off
    eval_generate: int = 0  # held-out examples answered greedily at the end, scored by ROUGE-L F1; 0 = off
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    seed: int = 0
    precision: str = "bf16"  # bf16 = bf16 autocast with fp32 weights and optimizer state; fp32
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    # scale-out (torch.distributed under torchrun): batch_size is per process, so the global batch is
    # batch_size x grad_accum x processes; see rankwise.train.dist
    nproc: int = 1  # processes on this machine; > 1 re-launches the command under torchrun
    parallel: str = "ddp"  # ddp (replicated weights) | fsdp (FSDP2 fully_shard: weights, grads, state sharded)
    count_flops: bool = True  # FLOPs per step: counted (torch.utils.flop_counter) for the first steps, then predicted
    compile: bool = False  # torch.compile the decoder for the loss (training and evaluation; not generation)
    sample: bool = True  # print a before/after generation for one held-out function
    report_to: list[str] = field(default_factory=list)  # also write every metrics record to: tensorboard (<out>/tensorboard/)
    out: str = "runs/default"
    resume: str | None = None  # a checkpoint directory, a run directory, or "latest" (in `out`)
    overwrite: bool = False  # start over in an `out` that already holds a run (its files are replaced)
    hooks: list[str] = field(default_factory=list)  # step hooks without a switch of their own, by name (rankwise.hooks)
    fast_forward: bool = False  # the one Fast Forward switch: stages between optimizer steps (rankwise.hooks.fast_forward)
    ff: dict = field(default_factory=dict)  # Fast Forward options, e.g. ff.interval=6

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(Config)


def parse_value(text: str):
    """Parse an override value the way a user means it: 1e-4 is a float, true a bool, [a,b] a list."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "none", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or "YAML error"
            raise ConfigError(f"{text!r} is not a valid list or mapping ({problem})") from None
    return text


def coerce(name: str, value, hint):
    """Convert `value` to the declared type of field `name`, or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(name, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()  # nan, inf are not
        if isinstance(value, bool) or not whole:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        number = float(value) if abs(value) < 1e308 else math.inf  # float() of a huge int overflows
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [coerce(name, v, item) for v in value]
    if origin is tuple:
        if isinstance(value, str):
            value = [parse_value(v) for v in value.strip("()[]").split(",")]
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{name} must have {len(items)} values, got {value!r}")
        return tuple(coerce(name, v, t) for v, t in zip(value, items))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _parse(key: str, text: str):
    try:
        return parse_value(text)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def _unknown(key: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] | dict = ()) -> Config:
    """Build a Config from an optional YAML file, then overrides (later wins): `key=value` strings as
    typed on the command line, or a mapping of keys to values already typed (`{"lr": 1e-3}`).

    Dotted keys set entries of mapping fields: `optimizer_args.simple=true`.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        named = [key for key in loaded if not isinstance(key, str)]
        if named:
            raise ConfigError(f"config file {path}: keys must be names, got {named[0]!r}")
        raw.update(loaded)
    hints = _field_types()
    if isinstance(overrides, dict):
        pairs = [(str(key), value) for key, value in overrides.items()]
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"expected key=value, got {item!r}")
            key, text = item.split("=", 1)
            pairs.append((key.strip(), _parse(key.strip(), text)))
    for key, value in pairs:
        head, _, sub = key.partition(".")
        if sub:
            if head not in hints or typing.get_origin(hints[head]) is not dict and hints[head] is not dict:
                raise ConfigError(f"{head!r} has no sub-keys (in {key!r})")
            raw.setdefault(head, {})
            if not isinstance(raw[head], dict):
                raise ConfigError(f"{head} must be a mapping, got {raw[head]!r} (before {key!r})")
            raw[head] = dict(raw[head])
            raw[head][sub] = value
        else:
            raw[key] = value
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown(key)
        values[key] = coerce(key, value, hints[key])
    return Config(**values)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
