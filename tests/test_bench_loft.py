"""`rankwise bench loft`: each sweep's best and the share of the LoRA-to-full gap that LoFT closes (the
published "gap closed"), and DoRA's setting taken from LoRA's best, on hand-made rows."""
from __future__ import annotations

import pytest

from rankwise.bench.loft import dora_at, summarize


def _row(label, rank, loss=None, **extra):
    return {"label": label, "rank": rank, **({"eval_loss": loss} if loss is not None else {"error": "died"}), **extra}


ROWS = [_row("full lr=0.0001", None, 2.1), _row("full lr=0.0003", None, 2.0), _row("full lr=0.001", None),
        _row("lora lr=0.001 a=2r", 1, 3.0, overrides=["method=lora", "rank=1", "lr=0.001", "alpha=2.0"]),
        _row("lora lr=0.002 a=2r", 1, 2.8, overrides=["method=lora", "rank=1", "lr=0.002", "alpha=2.0"]),
        _row("lora lr=0.002 a=1r", 1, 2.9, overrides=["method=lora", "rank=1", "lr=0.002", "alpha=1.0"]),
        _row("lora lr=0.004 a=2r", 1), _row("loft lr=0.0001", 1, 2.5), _row("loft lr=0.0003", 1, 2.6),
        _row("loft-simple lr=0.004", 1, 2.7), _row("dora lr=0.002 a=2r", 1, 2.75),
        _row("lora lr=0.002 a=2r", 4, 1.9), _row("loft lr=0.0001", 4, 1.95),
        _row("lora lr=0.002 a=2r", 2), _row("loft lr=0.0001", 2, 2.4)]


def test_gap_closed_is_the_share_of_the_best_lora_to_best_full_gap_the_best_loft_closes():
    one, two, four = summarize(ROWS)
    assert (one["rank"], two["rank"], four["rank"]) == (1, 2, 4)
    assert one["full"] == 2.0 and one["full_label"] == "full lr=0.0003"  # the best of full's sweep, errors aside
    assert (one["lora"], one["loft"], one["loft-simple"], one["dora"]) == (2.8, 2.5, 2.7, 2.75)
    assert (one["lora_label"], one["loft_label"]) == ("lora lr=0.002 a=2r", "loft lr=0.0001")
    assert one["gap_closed"] == pytest.approx(0.375)  # (2.8 - 2.5) / (2.8 - 2.0)
    assert two["lora"] is None and two["loft"] == 2.4 and "gap_closed" not in two  # LoRA's only run failed
    assert four["lora"] == 1.9 and "gap_closed" not in four  # LoRA already beats full: no gap to close
    assert four["dora"] is None and four["dora_label"] is None


def test_dora_runs_at_the_best_lora_setting_of_its_rank_or_the_fallback():
    assert dora_at(ROWS, 1, (1e-3, 2.0)) == ("dora lr=0.002 a=2r", ["method=dora", "rank=1", "lr=0.002", "alpha=2"])
    assert dora_at(ROWS, 2, (1e-3, 2.0)) == ("dora lr=0.001 a=2r", ["method=dora", "rank=2", "lr=0.001", "alpha=4"])
