"""The run's record: one JSON object per line, appended as it happens, and a plot at the end.

Each record goes to the file in one unbuffered write, so a killed run leaves whole lines (at worst one
cut-off last line, which readers skip); a write that fails (full disk) is undone and raised as OSError.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rankwise.train.checkpoint import atomic_write_text


class MetricsLog:
    """Append-only JSONL log. Each record has a "kind": train, eval, or whatever a hook logs."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # on resume, forget what the interrupted run logged after its checkpoint (swapped in whole)
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record) + "\n").encode())
        size = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            os.ftruncate(self._fd, size)  # no half line: the log stays valid JSONL
            raise OSError(e.errno, f"could not append to {self.path}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
    evals = [r for r in records if r.get("kind") == "eval"]
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
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
