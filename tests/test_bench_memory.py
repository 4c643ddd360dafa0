"""`rankwise bench memory`: the peak-above-runtime ratio to LoRA at the same rank (the published memory
ratio) on hand-made rows, and both modes end to end on tiny models."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from rankwise.bench.memory import _memory_table


def _row(variant, rank, peak, start):
    return {"variant": variant, "rank": rank, "peak_mib": peak, "process_start_mib": start, "trainable": 10 * rank,
            "held_mib": 1.0, "saved_mib": 1.0, "optimizer_state_mib": 0.5}


def test_memory_ratio_is_each_peak_above_the_runtime_over_loras_at_the_same_rank():
    rows = [_row("lora-fa", 8, 250, 100), _row("lora", 8, 300, 100), _row("peft-lora-fa", 8, 280, 120),
            _row("lora", 32, 500, 100), _row("lora-fa", 32, 300, 100), _row("lora-fa", 64, 300, 100)]
    lines = _memory_table(rows).splitlines()[2:]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    got = {(c[0], int(c[1])): (c[4], c[5]) for c in cells}
    assert [key for key in got] == [("lora", 8), ("peft-lora-fa", 8), ("lora-fa", 8), ("lora", 32), ("lora-fa", 32),
                                    ("lora-fa", 64)]  # by rank, then in the variants' order
    assert got["lora", 8] == ("200", "1.00") and got["lora-fa", 8] == ("150", "0.75")  # 150 / 200
    assert got["peft-lora-fa", 8] == ("160", "0.80")  # its own runtime start: (280 - 120) / 200
    assert got["lora-fa", 32] == ("200", "0.50")  # against LoRA at 32, not at 8
    assert math.isnan(float(got["lora-fa", 64][1]))  # no LoRA at that rank


def _python(*argv: str) -> subprocess.CompletedProcess:
    """In its own process: building models here would leave torch threads that a later test's fork hangs on."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_tiny_scale_measures_a_training_step_in_a_fresh_worker(tmp_path):
    out = tmp_path / "memory.json"
    done = _python("-m", "rankwise", "bench", "memory", "--scale", "tiny", "--ranks", "4", "--variants", "lora",
                   "--batch", "1", "--seq", "16", "--threads", "1", "--device", "cpu", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["variant"], row["rank"], row["device"]) == ("lora", 4, "cpu")
    assert row["peak_mib"] >= row["before_mib"] > 0 and row["optimizer_state_mib"] > 0 and row["trainable"] > 0
    assert "| lora | 4 |" in done.stdout


def test_params_mode_counts_lora_and_lora_fa_on_a_tiny_model(tmp_path):
    out = tmp_path / "params.json"
    _python("-c", "import sys; from rankwise.tiny import make_tiny_model_dir; from rankwise.bench import run_bench; "
            "sys.exit(run_bench('memory', ['--params', '--model', str(make_tiny_model_dir(sys.argv[1])), "
            "'--param-rank', '4', '--out', sys.argv[2]]))", str(tmp_path / "tiny"), str(out))
    (row,) = json.loads(out.read_text())["rows"]
    lora, lora_fa = row["lora"], row["lora-fa"]
    assert 0 < lora_fa["trainable"] < lora["trainable"] < row["base_params"]  # LoRA-FA trains B only
    assert lora["percent"] == 100 * lora["trainable"] / row["base_params"] and lora["adapter_bytes"] > 0
