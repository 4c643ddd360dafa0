"""Benchmarks: each module measures one claim side by side in one run and reports it.

A benchmark module calls `register(name, main)` where `main(argv: list[str]) -> int` parses its own
options (argparse, with --help). `rankwise bench NAME ...` dispatches here. Benchmarks only measure:
they use the library, never the other way round.
"""
from __future__ import annotations

import ctypes
import gc
import json
from pathlib import Path
from typing import Callable

from rankwise.config import ConfigError

BENCHES: dict[str, Callable[[list[str]], int]] = {}


def register(name: str, main: Callable[[list[str]], int]) -> None:
    BENCHES[name] = main


def write_json(path, payload, indent: int = 2, default=None) -> None:
    """Write a result file atomically (a bench stopped mid-write leaves the previous version, never half a
    file), creating its folder."""
    from rankwise.train.checkpoint import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(payload, indent=indent, default=default) + "\n")


def positive_numbers(option: str, text, kind=float) -> list:
    """A comma-separated option's values, all > 0; ValueError with a one-line message naming the option."""
    try:
        values = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(v > 0 for v in values):
        raise ValueError(f"{option}: every value must be > 0, got {text!r}")
    return values


def proc_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} is not in /proc/self/status")


def trim_heap() -> None:
    """Collect garbage and give freed heap back to the OS, so RSS counts what is live (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may include freed memory
        pass


def reset_peak_rss() -> None:
    """trim_heap, then VmHWM := VmRSS (/proc/self/clear_refs), so the next VmHWM is the peak from here."""
    trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def training_batches(cfg, n: int) -> list[dict]:
    """The first `n` collated (CPU) batches `rankwise train` would draw for `cfg`: same stream, same order."""
    from rankwise.data import collate, encode_all, load_splits
    from rankwise.models import load_tokenizer
    from rankwise.train.stream import ExampleStream

    tok = load_tokenizer(cfg.model)
    items = encode_all(tok, load_splits(cfg.data).train, cfg.max_length)
    stream = ExampleStream(len(items), cfg.seed)
    return [collate([items[i] for i in stream.take(cfg.batch_size)], tok.pad_token_id) for _ in range(n)]


def run_bench(name: str, argv: list[str]) -> int:
    if name not in BENCHES:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHES)) or '-'}")
    return BENCHES[name](argv)


from rankwise.plugins import discover  # noqa: E402

discover(__name__, __path__, globals())
