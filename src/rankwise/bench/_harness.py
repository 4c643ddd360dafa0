"""What several benches share, written once: a run in a child process (so its memory is its own), the
built-in data as a small JSONL file, typed config overrides, --reuse of finished runs, a sweep's best.

A leading underscore keeps this module out of the bench registry (rankwise.plugins.discover skips it).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable


# ---- a run in its own process ------------------------------------------------------------------------
def in_child(fn: Callable, *args, fresh: bool = False, env: dict | None = None):
    """fn(*args) in a child process, its result returned, or {"error": one line} if it raised or died.

    fork (the default): the child inherits what the parent imported and prepared, and `fn` may be any
    callable. fresh: a new interpreter (`fn` a module-level function, arguments and result JSON), for a
    child that must start clean or whose allocator reads `env` at start-up (MALLOC_* variables).
    Fork only before threaded torch work in the parent: its thread pool does not survive a fork.
    """
    return _fresh(fn, args, env) if fresh else _forked(fn, args)


def _forked(fn: Callable, args: tuple):
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_send, args=(fn, args, there))
    child.start()
    there.close()  # else recv() would wait forever on a child that died without a word
    try:
        result = here.recv()
    except EOFError:  # killed, out of memory
        result = {"error": "the run's process died"}
    child.join()
    return result


def _send(fn: Callable, args: tuple, conn) -> None:
    try:
        conn.send(fn(*args))
    except BaseException as e:  # report, never hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


_FRESH = ("import importlib, json, sys; fn = getattr(importlib.import_module(sys.argv[1]), sys.argv[2]); "
          "print(json.dumps(fn(*json.loads(sys.argv[3]))))")


def _fresh(fn: Callable, args: tuple, env: dict | None):
    done = subprocess.run([sys.executable, "-c", _FRESH, fn.__module__, fn.__qualname__, json.dumps(args)],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])  # the last line: the run may print before it


# ---- the command line ----------------------------------------------------------------------------------
def device_or_exit(parser, name: str):
    """--device resolved (torch.device), or the parser's one-line usage error (exit 2) before anything loads."""
    from rankwise.runtime import resolve_device

    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as e:  # RuntimeError: a malformed name such as "gpu"
        parser.error(str(e).splitlines()[0])


# ---- data --------------------------------------------------------------------------------------------
def builtin_jsonl(path: Path, n: int | None = None) -> str:
    """The first `n` built-in examples (all when None) as a JSONL file of prompt/response rows; returns its
    path. All of them split exactly as the built-in set does (the split hashes content, not order)."""
    from rankwise.data.stdlib_docstrings import extract

    with Path(path).open("w") as f:
        for row in extract()[:n]:
            f.write(json.dumps({"prompt": row["prompt"], "response": row["response"]}) + "\n")
    return str(path)


# ---- config overrides --------------------------------------------------------------------------------
def typed(items: list[str]) -> dict:
    """`key=value` strings as typed on a command line -> {key: value}, each value parsed as load_config does."""
    from rankwise.config import ConfigError, parse_value

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = parse_value(text)
        except ConfigError as e:
            raise ConfigError(f"{key.strip()}: {e}") from None
        out.pop(key.strip(), None)  # a repeated key counts where it last appears
        out[key.strip()] = value
    return out


def layered(*layers: dict) -> dict:
    """Override mappings, a later one winning; its keys also move last, applied in the order a key=value
    list would apply them (so `optimizer_args.x` given after `optimizer_args` still counts)."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            out.pop(key, None)
            out[key] = value
    return out


# ---- --reuse: finished runs found again by their settings ----------------------------------------------
def run_key(settings) -> str:
    """One string per run's settings (a list, or a mapping in any key order): what --reuse looks up."""
    return json.dumps(settings, sort_keys=True)


def finished_rows(path: str | None, common) -> dict[str, dict]:
    """--reuse of a result file: its finished rows (those with an eval_loss) by run_key(row["overrides"]);
    {} when there is no file; SystemExit when it was made with other `common` settings."""
    if not path or not Path(path).exists():
        return {}
    old = json.loads(Path(path).read_text())
    if old.get("common") != common:
        raise SystemExit(f"--reuse: {path} was made with other settings ({old.get('common')}); "
                         "use another --out or drop --reuse")
    return {run_key(r["overrides"]): r for r in old.get("rows", []) if "eval_loss" in r}


def config_settings(config: dict) -> dict:
    """A recipe run's saved config as --reuse compares it: every key of today's Config (one newer than the
    run: its default), without overwrite and resume, which do not change what trains."""
    from rankwise.config import Config

    return {k: config.get(k, v) for k, v in Config().to_dict().items() if k not in ("overwrite", "resume")}


def finished_runs(folder: Path) -> dict[str, Path]:
    """--reuse of run directories: each run under `folder` that trained to its last step and evaluated
    there, by run_key(config_settings(its config.yaml))."""
    import yaml

    from rankwise.train.metrics import read_metrics

    found = {}
    for saved in sorted(Path(folder).glob("*/config.yaml")):
        config, metrics = yaml.safe_load(saved.read_text()), saved.parent / "metrics.jsonl"
        if not isinstance(config, dict) or not metrics.is_file():
            continue
        records = read_metrics(metrics)
        steps = [r["step"] for r in records if r["kind"] == "train"]
        last = config.get("steps")
        if steps and steps[-1] == last and records[-1]["kind"] == "eval" and records[-1]["step"] == last:
            found[run_key(config_settings(config))] = saved.parent
    return found


# ---- a sweep's best ------------------------------------------------------------------------------------
def selection_loss(row: dict) -> float:
    """The loss a sweep chooses its setting on: the row's validation loss where it has one (benches score the
    validation split, `validation_examples`), else its held-out test loss (the same favour for all)."""
    value = row.get("validation_loss")
    return row["eval_loss"] if value is None else value


def lowest(rows, loss: str | Callable):
    """The row with the lowest `loss` (a key, or a function of the row), the earlier on a tie; None if empty."""
    return min(rows, key=loss if callable(loss) else lambda row: row[loss], default=None)


def best_per(rows, group: str | Callable, loss: str | Callable) -> dict:
    """{group: its lowest-`loss` row}, groups in the order they first appear (`group`: a key or function)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(group(row) if callable(group) else row[group], []).append(row)
    return {name: lowest(members, loss) for name, members in groups.items()}
