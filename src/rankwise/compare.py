"""Several finished (or running) runs side by side: their losses in one PNG and a table of what they cost.

    load every run directory (refused in one line before anything is drawn) -> label them
    -> draw held-out loss (solid) and train loss (faint) against steps, FLOPs, seconds -> summarize

Everything is read from what a run directory already holds: metrics.jsonl (the records) and config.yaml.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from rankwise.config import ConfigError
from rankwise.train.metrics import read_metrics, save_png

# x axis name -> (the record's key, the axis label)
AXES = {"steps": ("step", "optimizer step"), "flops": ("cum_flops", "cumulative FLOPs"),
        "seconds": ("cum_seconds", "cumulative training seconds")}


@dataclass
class RunRecords:
    label: str
    path: Path
    records: list[dict]
    config: dict  # config.yaml as written by the run; {} when it has none

    def of_kind(self, kind: str, key: str) -> list[dict]:
        """The records of one kind that hold `key` (eval records also carry rouge_l without a loss)."""
        return [r for r in self.records if r.get("kind") == kind and key in r]


def load_runs(paths: list[str | Path]) -> list[RunRecords]:
    """Read every run directory, or raise ConfigError naming the first that is not one."""
    if not paths:
        raise ConfigError("compare needs at least one run directory")
    loaded = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"{path} is not a run directory ({'not a directory' if path.exists() else 'not found'})")
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise ConfigError(f"{path} is not a run directory (no metrics.jsonl)")
        try:
            records = [r for r in read_metrics(metrics) if isinstance(r, dict)]
        except UnicodeDecodeError:
            records = []
        if not records:
            raise ConfigError(f"{metrics} holds no records")
        loaded.append(RunRecords("", path, records, _config(path / "config.yaml")))
    for run, label in zip(loaded, labels([run.path for run in loaded])):
        run.label = label
    return loaded


def _config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML") from None
    return config if isinstance(config, dict) else {}


def labels(paths: list[Path]) -> list[str]:
    """Each run's directory name; where names repeat, as many parent folders as make them differ, then #n."""
    parts = [Path(p).absolute().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    # the same directory given twice
    return [f"{name}#{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def summarize(run: RunRecords) -> dict:
    """One table row: held-out loss (final and best, nats/token), median tokens/s of the train steps,
    peak memory (MiB) and trainable parameters where the run recorded them, and its method settings."""
    evals = [r["eval_loss"] for r in run.of_kind("eval", "eval_loss")]
    tok_s = [r["tok_s"] for r in run.of_kind("train", "tok_s")]
    model = run.of_kind("model", "trainable_params")
    return {"run": run.label, "method": run.config.get("method"), "optimizer": run.config.get("optimizer"),
            "lr": run.config.get("lr"), "trainable_params": model[-1]["trainable_params"] if model else None,
            "final_eval_loss": evals[-1] if evals else None, "best_eval_loss": min(evals) if evals else None,
            "median_tok_s": statistics.median(tok_s) if tok_s else None, "peak_mib": _peak_mib(run.records),
            "steps": max((r.get("step", 0) for r in run.records), default=0)}


def _peak_mib(records: list[dict]) -> float | None:
    """The largest peak memory any record holds: `peak_mib`, or a `peak_*_bytes` field in MiB."""
    peaks = [value / (2 ** 20 if key.endswith("_bytes") else 1) for r in records for key, value in r.items()
             if (key == "peak_mib" or key.startswith("peak_") and key.endswith("_bytes"))
             and isinstance(value, (int, float))]
    return max(peaks, default=None)


COLUMNS = (("run", "run", "{}"), ("method", "method", "{}"), ("optimizer", "optimizer", "{}"), ("lr", "lr", "{:g}"),
           ("trainable", "trainable_params", "{:,}"), ("steps", "steps", "{}"),
           ("final held-out", "final_eval_loss", "{:.4f}"), ("best held-out", "best_eval_loss", "{:.4f}"),
           ("median tok/s", "median_tok_s", "{:.0f}"), ("peak MiB", "peak_mib", "{:.0f}"))


def format_table(rows: list[dict]) -> str:
    """The rows as aligned text columns; '-' where a run did not record a value."""
    cells = [[title for title, _, _ in COLUMNS]]
    cells += [["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     .rstrip() for line in cells)


def plot(runs: list[RunRecords], path: Path, axes: list[str]) -> None:
    """Held-out loss (solid, dots) and train loss (faint) of every run, one panel per x axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False)
    for panel, axis in zip(panels[0], axes):
        x_key, x_label = AXES[axis]
        for i, run in enumerate(runs):
            train = [r for r in run.of_kind("train", "loss") if x_key in r]
            evals = [r for r in run.of_kind("eval", "eval_loss") if x_key in r]
            panel.plot([r[x_key] for r in train], [r["loss"] for r in train], color=f"C{i}", alpha=0.3, lw=1)
            panel.plot([r[x_key] for r in evals], [r["eval_loss"] for r in evals], "o-", color=f"C{i}",
                       label=run.label)
        panel.set_xlabel(x_label)
        panel.set_ylabel("loss (nats/token)")
        panel.grid(alpha=0.3)
        panel.legend(title="held-out (solid), train (faint)", fontsize="small", title_fontsize="small")
    fig.tight_layout()
    save_png(fig, path)


def compare(paths: list[str | Path], out: str | Path = "compare.png", axes: list[str] | None = None) -> list[dict]:
    """Draw the runs' losses into `out` (a PNG) and return one summary row per run (see summarize)."""
    axes = list(AXES) if not axes else list(axes)
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise ConfigError(f"unknown x axis {unknown[0]!r}; choose from: {', '.join(AXES)}")
    out = Path(out)
    if not out.absolute().parent.is_dir():
        raise ConfigError(f"cannot write {out}: {out.absolute().parent} is not a directory")
    runs = load_runs(paths)
    plot(runs, out, axes)
    return [summarize(run) for run in runs]
