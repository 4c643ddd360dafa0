"""The LoFT bench's sweeps as a picture: held-out loss against lr, one panel per rank.

Each method's sweep is a line (LoRA one line per alpha/r), DoRA the single point it ran at, full
fine-tuning's sweep the same grey line in every panel with its best as a dashed level, so "does LoFT get
closer to full fine-tuning than LoRA does, and is its best interior" can be read at a glance.
"""
from __future__ import annotations

import re
from pathlib import Path

STYLE = {"loft": ("LoFT", "C3"), "loft-simple": ("LoFT simple", "C1"), "lora": ("LoRA+AdamW", "C0"),
         "dora": ("DoRA", "C2")}
LINES = ("o-", "^--", "v:", "s-.")  # LoRA's alphas, one line style each, in ascending alpha/r order


def _setting(label: str, key: str) -> float | None:
    found = re.search(rf"\b{key}=([0-9.e+-]+)", label)
    return float(found.group(1)) if found else None


def sweeps(rows: list[dict], rank: int | None) -> dict[str, list[tuple[float, float]]]:
    """{line name: [(lr, held-out loss), ...] sorted by lr} for the finished runs at `rank` (None: full)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["rank"] != rank or "eval_loss" not in row:
            continue
        kind = row["label"].split(" ")[0]
        alpha = re.search(r"\ba=(\S+)", row["label"])
        name = kind + (f" a={alpha.group(1)}" if kind == "lora" and alpha else "")
        lines.setdefault(name, []).append((_setting(row["label"], "lr"), row["eval_loss"]))
    return {name: sorted(points) for name, points in lines.items()}


def plot_sweeps(rows: list[dict], path: Path, title: str = "") -> list[int]:
    """Draw every rank's sweeps into `path` (PNG); returns the ranks drawn, in panel order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
    full = sweeps(rows, None).get("full", [])
    best_full = min((loss for _, loss in full), default=None)
    fig, axes = plt.subplots(1, len(ranks), figsize=(4.2 * len(ranks), 4.0), sharex=True,
                             sharey=True, squeeze=False)
    alphas = sorted({n.partition(" ")[2] for rank in ranks for n in sweeps(rows, rank) if " " in n},
                    key=lambda a: float(a.removeprefix("a=").removesuffix("r") or 0))
    for ax, rank in zip(axes[0], ranks):
        if full:
            ax.plot(*zip(*full), "s-", color="0.6", ms=4, label="full FT")
            ax.axhline(best_full, color="0.6", ls="--", lw=1)
        for name, points in sweeps(rows, rank).items():
            kind, _, alpha = name.partition(" ")
            label, color = STYLE[kind]
            line = LINES[alphas.index(alpha) % len(LINES)] if alpha else "o-"
            ax.plot(*zip(*points), line if len(points) > 1 else "D", color=color, ms=4,
                    label=label + (f" ({alpha})" if alpha else ""))
        ax.set_xscale("log")
        ax.set_title(f"rank {rank}")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss")
    finished = [r["eval_loss"] for r in rows if "eval_loss" in r]
    if best_full is not None and finished:  # diverged runs would flatten everything else
        low = min(finished)
        axes[0][0].set_ylim(low - 0.01, min(max(finished), best_full + 0.25) + 0.01)
    handles = {}  # every line once, whichever panel has it
    for ax in axes[0]:
        handles.update(zip(ax.get_legend_handles_labels()[1], ax.get_legend_handles_labels()[0]))
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # a stopped run never leaves half a picture
    return ranks
