"""`rankwise bench fast-forward`: the cost to reach the baseline's best held-out loss and the savings computed
from it (the published FLOPs-saved numbers), on hand-made curves; and the tiny scale end to end, twice, the
second time keeping every finished run (--reuse)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rankwise.bench._harness import builtin_jsonl
from rankwise.bench.fast_forward import _tuned, compare, cost_to_reach, user_view

# curve points: [optimizer step, cumulative FLOPs, cumulative seconds, held-out loss]
BASELINE = {"best_eval": 2.2, "curve": [[0, 0.0, 0.0, 3.0], [2, 100.0, 10.0, 2.5], [4, 200.0, 20.0, 2.2],
                                         [6, 300.0, 30.0, 2.3]]}
FF = {"curve": [[0, 0.0, 0.0, 3.0], [2, 120.0, 14.0, 2.3], [3, 150.0, 16.0, 2.2 + 1e-13], [5, 250.0, 25.0, 2.0]]}


def test_cost_to_reach_is_the_first_evaluation_at_or_below_the_target():
    assert cost_to_reach(BASELINE, 2.2) == {"step": 4, "flops": 200.0, "seconds": 20.0}
    assert cost_to_reach(FF, 2.2) == {"step": 3, "flops": 150.0, "seconds": 16.0}  # equal up to rounding counts
    assert cost_to_reach(BASELINE, 2.5) == {"step": 2, "flops": 100.0, "seconds": 10.0}
    assert cost_to_reach(BASELINE, 2.1) is None


def test_compare_gives_the_share_of_flops_seconds_and_steps_that_fast_forward_saved():
    got = compare(BASELINE, FF)
    assert got["target"] == 2.2 and got["reached"]
    assert got["baseline_cost"]["flops"] == 200.0 and got["ff_cost"]["flops"] == 150.0
    assert got["flops_saved"] == pytest.approx(0.25)  # 1 - 150 / 200
    assert got["seconds_saved"] == pytest.approx(0.2)  # 1 - 16 / 20
    assert got["steps_saved"] == pytest.approx(0.25)  # 1 - 3 / 4
    slower = {"curve": [[0, 0.0, 0.0, 3.0], [8, 400.0, 50.0, 2.1]]}
    assert compare(BASELINE, slower)["flops_saved"] == pytest.approx(-1.0)  # twice the FLOPs: -100%
    missed = compare(BASELINE, {"curve": [[0, 0.0, 0.0, 3.0], [6, 300.0, 30.0, 2.21]]})
    assert not missed["reached"] and missed["ff_cost"] is None and "flops_saved" not in missed


def _run(lr, curve):
    return {"lr": lr, "curve": curve, "final_eval": curve[-1][3], "cum_flops": curve[-1][1], "cum_seconds": curve[-1][2]}


def test_user_view_pays_the_whole_sweep_and_ff_up_to_the_worse_final_loss():
    ff = _run(1e-4, [[0, 0.0, 0.0, 3.0], [4, 40.0, 4.0, 2.6], [8, 90.0, 9.0, 2.5]])
    sweep = [_run(1e-3, [[0, 0.0, 0.0, 3.0], [8, 50.0, 6.0, 2.7]]), _run(3e-3, [[0, 0.0, 0.0, 3.0], [8, 50.0, 5.0, 2.4]])]
    results = {"paper": {"ff": ff}, "tuned": {"sweep": sweep, "baseline": sweep[1]}}
    view = user_view(results)
    assert view["target"] == 2.5  # the worse of FF's 2.5 and the sweep's best 2.4: both reach it
    assert view["sweep_flops"] == 100.0 and view["sweep_seconds"] == 11.0  # every run of the sweep, in full
    assert view["ff_to_target"] == {"step": 8, "flops": 90.0, "seconds": 9.0}
    assert view["flops_ratio"] == pytest.approx(0.9) and view["seconds_ratio"] == pytest.approx(9 / 11)
    ff["curve"][-1][3] = ff["final_eval"] = 2.3  # FF ends better: it pays only up to the sweep's 2.4
    view = user_view(results)
    assert view["target"] == 2.4 and view["ff_to_target"]["step"] == 8  # 2.6 at step 4, then 2.3 at step 8 ...
    ff["curve"].insert(2, [6, 60.0, 6.0, 2.4])
    assert user_view(results)["ff_to_target"]["flops"] == 60.0  # ... the first evaluation at or below it
    assert user_view({"paper": results["paper"]}) is None  # no sweep ran: nothing to compare


def test_tuned_regime_runs_fast_forward_at_the_sweeps_best_lr():
    said, calls = [], []

    def runs(name, overrides, ff=None):
        calls.append((name, overrides["lr"], ff))
        loss = {1e-3: 2.5, 3e-3: 2.2, 1e-2: 2.2}[overrides["lr"]]  # a tie: the earlier lr wins
        return {"lr": overrides["lr"], "best_eval": loss, "curve": [[0, 0.0, 0.0, 3.0], [2, 10.0, 1.0, loss]]}

    scale = {"tuned": {"lrs": [1e-3, 3e-3, 1e-2], "schedule": "cosine"}, "ff": {"interval": 4}}
    tuned = _tuned(scale, runs, said.append)
    assert tuned["baseline"]["lr"] == 3e-3 and calls[-1] == ("tuned-ff", 3e-3, {"interval": 4})
    assert [lr for _, lr, _ in calls[:3]] == [1e-3, 3e-3, 1e-2] and tuned["ff_vs_baseline"]["target"] == 2.2
    assert not any("edge of the sweep" in line for line in said)


def test_tuned_regime_chooses_its_lr_on_the_validation_split_where_runs_scored_it():
    def runs(name, overrides, ff=None):  # test and validation disagree: the choice must follow validation
        test, validation = {1e-3: (2.1, 2.9), 3e-3: (2.4, 2.3)}[overrides["lr"]]
        return {"lr": overrides["lr"], "best_eval": test, "validation_loss": validation,
                "curve": [[0, 0.0, 0.0, 3.0], [2, 10.0, 1.0, test]]}

    tuned = _tuned({"tuned": {"lrs": [1e-3, 3e-3]}, "ff": {"interval": 4}}, runs, lambda *_: None)
    assert tuned["baseline"]["lr"] == 3e-3 and tuned["ff"]["lr"] == 3e-3


def _bench(tmp_path, *extra) -> tuple[dict, str]:
    """The command in its own process (training here would leave torch threads that a later fork hangs on), on
    300 built-in examples: each run then tokenizes its data in a blink."""
    out, data = tmp_path / "ff.json", tmp_path / "data.jsonl"
    if not data.exists():
        builtin_jsonl(data, 300)
    small = [f"data={data}", "steps=2", "eval_every=1", "grad_accum=1", "batch_size=2", "eval_examples=4",
             "ff.burn_in=1", "ff.interval=1", "ff.tiny_examples=2", "ff.cap=4"]
    done = subprocess.run([sys.executable, "-m", "rankwise", "bench", "fast-forward", "--scale", "tiny", "--lrs",
                           "1e-3", "--workdir", str(tmp_path / "work"), "--out", str(out), *extra, *small],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_tiny_scale_runs_every_regime_and_reuse_keeps_every_finished_run(tmp_path):
    first, _ = _bench(tmp_path, "--plot", str(tmp_path / "ff.png"))
    assert set(first["results"]) == {"paper", "tuned", "control"}
    assert "ff_reference" in first["results"]["paper"] and first["results"]["control"]["baseline"]["method"] == "full"
    assert all("target" in regime["ff_vs_baseline"] for regime in first["results"].values())
    assert (tmp_path / "ff.png").read_bytes()[:4] == b"\x89PNG"
    again, printed = _bench(tmp_path, "--reuse")
    assert printed.count("(reusing the finished run in") == 7  # paper 3, tuned 2, control 2

    def measured(x):  # the result without the wall time of the (re)invocation
        if isinstance(x, dict):
            return {k: measured(v) for k, v in x.items() if k != "wall_seconds"}
        return [measured(v) for v in x] if isinstance(x, list) else x

    assert measured(again["results"]) == measured(first["results"])
    tuned = first["results"]["tuned"]
    assert first["user_view"]["sweep_flops"] == sum(r["cum_flops"] for r in tuned["sweep"])
    # --report trains nothing and prints the same tables and choice from the file
    shown = subprocess.run([sys.executable, "-m", "rankwise", "bench", "fast-forward", "--report",
                            str(tmp_path / "ff.json")], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert printed.split("total wall time")[0].split("| regime |")[1] in shown.stdout
    assert "the user's choice: one FF run" in shown.stdout
