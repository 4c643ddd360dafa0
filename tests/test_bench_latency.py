"""`rankwise bench latency`: the decode targets (fused FFBA against the base model and unmerged LoRA) on
hand-made timings, and the timing mode end to end at tiny scale."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rankwise.bench.latency import targets


def _timings(per_batch: dict[int, dict[str, float]]) -> dict:
    """{variant: {batch: timing}} from decode seconds per token; prefill the same for all, so it cannot pass."""
    variants = {v for decode in per_batch.values() for v in decode}
    return {"timings": {v: {b: {"decode_s_per_token": decode[v], "prefill_s": 0.5} for b, decode in per_batch.items()}
                        for v in variants}}


def test_targets_are_fused_decode_within_5pct_of_base_and_at_most_85pct_of_unmerged_lora():
    result = _timings({1: {"base": 0.010, "lora unmerged": 0.020, "ffba fused": 0.0104},
                       8: {"base": 0.010, "lora unmerged": 0.012, "ffba fused": 0.0106}})
    got = targets(result, [1, 8])
    assert got[1]["fused_vs_base"] == pytest.approx(1.04) and got[1]["fused_vs_lora_unmerged"] == pytest.approx(0.52)
    assert got[1]["met_base"] and got[1]["met_lora"]
    assert got[8]["fused_vs_base"] == pytest.approx(1.06)
    assert got[8]["fused_vs_lora_unmerged"] == pytest.approx(0.0106 / 0.012)
    assert not got[8]["met_base"] and not got[8]["met_lora"]  # 1.06 > 1.05 and 0.883 > 0.85
    assert list(targets(result, [8])) == [8]  # only the batches asked for


def test_tiny_scale_times_every_configuration_end_to_end(tmp_path):
    out = tmp_path / "latency.json"
    done = subprocess.run([sys.executable, "-m", "rankwise", "bench", "latency", "--scale", "tiny", "--batches", "1,2",
                           "--new-tokens", "2", "--prompt-tokens", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["mode"] == "latency" and record["repeats"] == 5
    assert set(record["timings"]) == {"base", "lora merged", "lora unmerged", "dora unmerged", "ffba unfused",
                                      "ffba fused"}
    assert all(t[b]["decode_s_per_token"] > 0 for t in record["timings"].values() for b in ("1", "2"))
    assert set(record["targets"]) == {"1", "2"} and record["ffba_fused_tokens_equal_unfused"]
    assert "FFBA fused generates the same tokens as unfused: True" in done.stdout
