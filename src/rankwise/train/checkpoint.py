"""Checkpoints that survive interruption: written to a temporary directory, fsynced, then renamed.

Layout of a run directory:
    config.yaml  metrics.jsonl  loss.png
    checkpoints/step-000040/{adapter/, state.pt, rankwise.json}
    latest       one line: the newest complete checkpoint, relative to the run directory
A checkpoint directory exists under its final name only once every file in it is complete, and
`latest` is replaced atomically, so a kill at any moment leaves the previous checkpoint usable.
A full disk is reported as an OSError whichever library was writing when it filled.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

META = "rankwise.json"
STATE = "state.pt"
ADAPTER = "adapter"
LATEST = "latest"


def load_state(path: Path) -> dict:
    """A state.pt read without running pickled code (torch.load weights_only=True): tensors, numbers,
    strings and containers, plus the classes in `safe_classes()`. Anything else in the file — a tampered
    checkpoint's code, say — raises pickle.UnpicklingError instead of running."""
    with torch.serialization.safe_globals(safe_classes()):
        return torch.load(path, weights_only=True)


# non-tensor objects optimizers keep in their state (matrices, seeds and counters), as (module, class)
STATE_CLASSES = [("galore_torch.galore_projector", "GaLoreProjector"),  # optimizer=galore
                 ("apollo_torch.random_projector", "GradientProjector"),  # optimizer=apollo, proj=random
                 ("apollo_torch.svd_projector", "GaLoreProjector")]  # optimizer=apollo, proj=svd


def safe_classes() -> list[type]:
    """The classes of STATE_CLASSES whose package is installed."""
    found = []
    for module, name in STATE_CLASSES:
        try:
            found.append(getattr(_import_plain(module), name))
        except ImportError:
            continue
    return found


def _import_plain(module: str):
    """Import `module`; if its package's __init__ fails (galore-torch and apollo-torch import their 8-bit
    variants there, which need bitsandbytes), import it from a bare stand-in of the installed package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        name = module.partition(".")[0]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            raise
        package = types.ModuleType(name)
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[name] = package
        return importlib.import_module(module)


def probe_write(directory: Path, nbytes: int = 1 << 16) -> None:
    """Raise OSError unless `nbytes` can be written and fsynced to a new file in `directory`.

    Only a real write tells: root ignores permission bits, and a full disk shows no other way."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".write-probe.")
    try:
        data = memoryview(bytes(nbytes))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling of `final` to fill; on success it is fsynced and renamed to `final`
    (replacing an older one), on any exception it is removed: `final` is always complete or absent."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    old = final.parent / f".old-{final.name}"  # a replaced `final` waits here between the two renames
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, step: int, write_adapter, state: dict, meta: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` checkpoints.

    `write_adapter(path)` writes the method's artifact into an existing empty directory.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        try:
            (tmp / ADAPTER).mkdir()
            write_adapter(tmp / ADAPTER)
            torch.save(state, tmp / STATE)
            (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
        except Exception as e:
            _raise_if_unwritable(tmp, e)
            raise
    atomic_write_text(run_dir / LATEST, str(final.relative_to(run_dir)) + "\n")
    _prune(root, keep, final)
    return final


def _raise_if_unwritable(directory: Path, error: Exception) -> None:
    """Re-raise a writer's failure as OSError when the disk is at fault: safetensors (Rust) and torch
    report a full disk as their own exception types, which callers could not tell from a bug."""
    if isinstance(error, OSError):
        return
    code = re.search(r"\(os error (\d+)\)", str(error))  # how Rust's io::Error names the errno
    if code:
        raise OSError(int(code[1]), f"{os.strerror(int(code[1]))} (while writing: {error})") from error
    try:  # a writer that left its partial file behind: is the disk still refusing?
        probe_write(directory, 4096)
    except OSError as disk:
        raise OSError(disk.errno, f"{disk.strerror} (while writing: {error})") from error


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def _prune(root: Path, keep: int, newest: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != newest:
            hidden = root / f".{old.name}.pruned"  # out of view first: a kill mid-delete shows no half checkpoint
            old.rename(hidden)
            shutil.rmtree(hidden, ignore_errors=True)
    for stale in [*root.glob(".step-*"), *root.glob(".old-step-*")]:  # left by interrupted saves
        shutil.rmtree(stale, ignore_errors=True)


def resolve(resume: str, run_dir: Path) -> Path:
    """Checkpoint directory for `resume`: "latest" (in run_dir), a run directory, or a checkpoint."""
    path = run_dir if resume == "latest" else Path(resume)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
        if not path.exists() and _complete(path.parent / f".old-{path.name}"):
            path = path.parent / f".old-{path.name}"  # killed between the two renames of a re-save
    if not _complete(path):
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    return path


def _complete(path: Path) -> bool:
    return (path / META).is_file() and (path / STATE).is_file() and (path / ADAPTER).is_dir()


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META).read_text())
