"""The run's record: one JSON object per line, appended as it happens, and a plot at the end.

Each record goes to the file in one unbuffered write, so a killed run leaves whole lines (at worst one
cut-off last line, which readers skip); a write that fails (full disk) is undone and raised as OSError.
With report_to=[tensorboard] every record is also written as TensorBoard scalars in <out>/tensorboard/;
metrics.jsonl stays the record, the event files are a view of it.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from rankwise.config import ConfigError
from rankwise.train.checkpoint import atomic_write_text

REPORTERS = ("tensorboard",)  # where records go besides metrics.jsonl (config key report_to)


def check_report_to(report_to: list[str]) -> None:
    """Refuse, in one line, a reporter that is unknown or whose package is not installed."""
    for name in report_to:
        if name not in REPORTERS:
            raise ConfigError(f"unknown report_to value {name!r}; choose from: {', '.join(REPORTERS)}")
    if "tensorboard" in report_to and not _installed("tensorboard"):
        raise ConfigError("report_to=tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install -e '.[tensorboard]')")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


class MetricsLog:
    """Append-only JSONL log. Each record has a "kind": train, eval, or whatever a hook logs.

    `header` is written first when the log starts empty (a new run: e.g. the model's parameter counts);
    `report_to` names the REPORTERS that get every record too.
    """

    def __init__(self, path: Path, truncate_after_step: int | None = None, report_to: list[str] = (),
                 header: dict | None = None):
        self.path = Path(path)
        check_report_to(report_to)
        if truncate_after_step is not None and self.path.exists():
            # on resume, forget what the interrupted run logged after its checkpoint (swapped in whole)
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fresh = os.fstat(self._fd).st_size == 0
        self._board = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard drops earlier event files' steps >= purge_step: what the log forgot, or all of a
            # replaced run's; a log appended to as it is keeps them
            purge = truncate_after_step + 1 if truncate_after_step is not None else 0 if fresh else None
            self._board = SummaryWriter(self.path.parent / "tensorboard", purge_step=purge)
        if header is not None and fresh:
            self.write(header)

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record) + "\n").encode())
        size = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            os.ftruncate(self._fd, size)  # no half line: the log stays valid JSONL
            raise OSError(e.errno, f"could not append to {self.path}: {e.strerror}") from None
        if self._board is not None:
            step = record.get("step", 0)
            fields = {k: v for k, v in record.items() if k not in ("kind", "step")}
            for tag, value in _scalars(record.get("kind", "record"), fields):
                self._board.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._board is not None:
            self._board.close()
            self._board = None


def _scalars(prefix: str, values: dict):
    """(tag, value) for every number, tagged "<kind>/<key>"; booleans count as 0/1, nested mappings
    extend the tag, text and lists are left to metrics.jsonl."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _scalars(f"{prefix}/{key}", value)
        elif isinstance(value, (bool, int, float)):
            yield f"{prefix}/{key}", float(value)


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill; everything before it is good
            break
    return records


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """Train and held-out loss against optimizer steps and against cumulative FLOPs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    ff = [r for r in records if r.get("kind") == "ff"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, x_label in ((axes[0], "step", "optimizer step"), (axes[1], "cum_flops", "cumulative FLOPs")):
        if train:
            ax.plot([r[x_key] for r in train], [r["loss"] for r in train], alpha=0.5, label="train loss")
        if evals:
            ax.plot([r[x_key] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
        for r in ff:  # Fast Forward stages: solid where steps were accepted, faint where none
            ax.axvline(r[x_key], color="C3", lw=0.8, alpha=0.5 if r["accepted"] else 0.15)
        ax.set_xlabel(x_label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG under a temporary name, then rename it: never a half image."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
