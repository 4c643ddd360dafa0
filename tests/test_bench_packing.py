"""`rankwise bench packing` and `rankwise bench overhead` run end to end at tiny scale."""
from __future__ import annotations

import json
import statistics

import pytest

from rankwise.bench import run_bench


def test_packing_bench_reports_less_padding_packed(tiny_model_dir, tmp_path):
    out = tmp_path / "packing.json"
    assert run_bench("packing", ["--batches", "3", "--out", str(out), f"model={tiny_model_dir}", "batch_size=8"]) == 0
    result = json.loads(out.read_text())
    share = result["padding_share"]
    assert 0 <= share["packed"] < share["unpacked"] < 1
    assert result["slots"]["packed"] < result["slots"]["unpacked"]


def test_overhead_bench_reports_every_variant_and_ratio(tmp_path):
    out = tmp_path / "overhead.json"
    assert run_bench("overhead", ["--steps", "5", "--repeats", "1", "--variants", "minimal,rankwise,flops",
                                  "--out", str(out), "batch_size=2"]) == 0
    result = json.loads(out.read_text())
    assert set(result["median_s"]) == {"minimal", "rankwise", "flops"}
    assert all(len(r) == 1 and len(r[0]) == 5 for r in result["step_seconds"].values())
    ratios = result["ratios"]
    steps = result["step_seconds"]  # one repeat: the ratio is that repeat's medians after warm-up, paired
    assert ratios["rankwise/minimal"]["median"] == pytest.approx(
        statistics.median(steps["rankwise"][0][3:]) / statistics.median(steps["minimal"][0][3:]))
    assert set(ratios) == {"rankwise/minimal", "flops/rankwise"}
