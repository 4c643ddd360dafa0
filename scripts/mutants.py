"""Mutation check: each listed test must fail when the behaviour it is named after breaks.

    python3 scripts/mutants.py [--only SUBSTRING] [--out docs/results/mutants.json]

Every entry of MUTANTS plants one realistic bug: an exact snippet of a file under src/ (it must occur
there exactly once) is replaced by a broken version. The repository's src/, tests/ and pyproject.toml are
snapshotted once into a temporary directory, and never touched in place. For each mutant the snapshot is
copied to a fresh directory, the bug is planted there, and the one test node that should notice it runs

    python3 -m pytest -q -x -p no:cacheprovider <node>

in that directory with PYTHONPATH=<copy>/src first (checked: `import rankwise` there resolves into the copy,
so the editable install of the real tree is not what runs).

Results:
    caught    pytest exited 1 with at least one failed test, and the same node passes on the unmutated
              snapshot (a test that fails anyway catches nothing);
    survived  pytest exited 0: the test passed with the bug in place;
    error     anything else: the unmutated node fails, a collection or usage error (exit 2, 4, 5, ...),
              only setup errors and no failed test, or a timeout. Not a catch.

One line per mutant is printed as it finishes; the rows, the UTC date and the git commit go to --out.
Exit status 1 when any mutant survived or errored.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "pyproject.toml")  # what the tests need; no root conftest.py in this repo
TIMEOUT_S = 900  # per pytest run


@dataclass(frozen=True)
class Mutant:
    test: str  # pytest node id, relative to the repository root
    file: str  # the mutated file, relative to src/
    old: str  # must occur exactly once in that file
    new: str
    bug: str  # one line: what is broken


FF = "tests/test_fast_forward.py::"
MUTANTS = [
    Mutant(FF + "test_doubling_needs_fewer_evaluations_than_linear", "rankwise/fastforward/search.py",
           "s = min(2.0 * b, cap)", "s = min(b + 1.0, cap)",
           "the doubling search grows s by +1 instead of doubling it (a linear search in disguise)"),
    Mutant(FF + "test_stage_reverts_to_best", "rankwise/fastforward/core.py",
           "move_to(result.kept_s)", "move_to(result.points[-1][0])",
           "a stage leaves the weights at the last point it evaluated instead of going back to the best"),
    Mutant(FF + "test_stage_never_accepts_a_worse_point", "rankwise/fastforward/search.py",
           "return min(((v if math.isfinite(v) else math.inf, s) for s, v in self.points))[::-1]",
           "return min(((v if math.isfinite(v) else math.inf, s) for s, v in self.points if s > 0))[::-1]",
           "the search's best point ignores f(0), so a stage moves even when every step is worse (free first step)"),
    Mutant(FF + "test_recipe_ff_lowers_the_held_out_loss_at_equal_optimizer_steps", "rankwise/fastforward/core.py",
           "move_to(result.kept_s)", "move_to(0.0)",
           "a stage searches and logs its move but always restores s=0, so FF never changes the weights"),
    Mutant(FF + "test_trainer_callback", "rankwise/fastforward/callback.py",
           "**{k: stage[k] for k in", '**{k: stage["loss_before" if k == "loss_after" else k] for k in',
           "the Trainer callback records loss_before as the stage's loss_after"),
    Mutant("tests/test_loft.py::test_fast_forward_runs_on_loft_moves", "rankwise/fastforward/core.py",
           "d.neg_().add_(w).div_(span)", "d.sub_(w).div_(span)",
           "the FF direction is W_snapshot - W_t: stages extrapolate LoFT's step backwards"),
    Mutant("tests/test_loft.py::test_bench_tiny_trains_each_run_in_its_own_process_and_keeps_the_results",
           "rankwise/bench/loft.py",
           'proc_kib("VmHWM") / 1024', 'proc_kib("VmHWM")',
           "the LoFT bench reports the process's peak RSS in KiB under peak_mb"),
    Mutant("tests/test_ffba.py::test_latency_bench_compares_equal_budgets", "rankwise/bench/latency.py",
           "if run > 0:", "if run >= 0:",
           "the latency bench keeps the warm-up run among its timed samples"),
    Mutant("tests/test_task_metric.py::test_batched_generation_gives_each_prompt_its_unbatched_reply",
           "rankwise/generate.py",
           "ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)\n"
           "    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)",
           "ids = torch.tensor([p + [tok.pad_token_id] * (width - len(p)) for p in prompts], device=device)\n"
           "    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)",
           "batched generation pads prompts on the right, so short prompts continue after their padding"),
    Mutant("tests/test_bench_fast_forward.py::"
           "test_compare_gives_the_share_of_flops_seconds_and_steps_that_fast_forward_saved",
           "rankwise/bench/fast_forward.py",
           'out["flops_saved"] = 1 - fast["flops"] / base["flops"]', 'out["flops_saved"] = fast["flops"] / base["flops"]',
           "flops_saved is FF's FLOPs over the baseline's (fast/base) instead of 1 - fast/base"),
    Mutant("tests/test_bench_fast_forward.py::test_cost_to_reach_is_the_first_evaluation_at_or_below_the_target",
           "rankwise/bench/fast_forward.py",
           "if loss <= target + 1e-12:", "if loss < target:",
           "cost_to_reach needs a loss strictly below the target (at-the-target no longer counts)"),
    Mutant("tests/test_bench_memory.py::"
           "test_memory_ratio_is_each_peak_above_the_runtime_over_loras_at_the_same_rank",
           "rankwise/bench/memory.py",
           'ratio = above / lora[r["rank"]]', 'ratio = r["peak_mib"] / lora[r["rank"]]',
           "the memory ratio divides the row's whole process peak (runtime not subtracted) by LoRA's"),
    Mutant("tests/test_bench.py::test_throughput_ratio_is_the_median_over_repeats_of_each_side_then_their_quotient",
           "rankwise/bench/throughput.py",
           "median = {side: statistics.median(values) for side, values in tokens_per_s.items()}",
           "median = {side: statistics.mean(values) for side, values in tokens_per_s.items()}",
           "the throughput ratio uses each side's mean tokens/s over repeats instead of the median"),
    Mutant("tests/test_bench_latency.py::"
           "test_targets_are_fused_decode_within_5pct_of_base_and_at_most_85pct_of_unmerged_lora",
           "rankwise/bench/latency.py",
           '"met_base": vs_base <= 1.05', '"met_base": vs_base <= 1.10',
           "the fused-vs-base decode target allows 10% instead of 5%"),
    Mutant("tests/test_bench_loft.py::"
           "test_gap_closed_is_the_share_of_the_best_lora_to_best_full_gap_the_best_loft_closes",
           "rankwise/bench/loft.py",
           'line["gap_closed"] = (lora - loft) / (lora - full)', 'line["gap_closed"] = (lora - loft) / (loft - full)',
           "gap closed divides by LoFT-to-full instead of the LoRA-to-full gap"),
    Mutant("tests/test_bench_fast_forward.py::"
           "test_tuned_regime_chooses_its_lr_on_the_validation_split_where_runs_scored_it",
           "rankwise/bench/fast_forward.py",
           'best = lowest(sweep, lambda r: r["best_eval"] if r.get("validation_loss") is None else r["validation_loss"])',
           'best = lowest(sweep, lambda r: r["best_eval"])',
           "the tuned regime picks its lr on the test loss instead of the validation loss"),
    Mutant("tests/test_bench_optimizers.py::test_steps_to_reach_is_the_first_step_at_or_below_the_target",
           "rankwise/bench/optimizers_finetune.py",
           "if loss <= target", "if loss < target",
           "steps_to_reach needs a loss strictly below the target (at-the-target no longer counts)"),
    Mutant("tests/test_ffba_quality_bench.py::test_lr_is_chosen_on_validation_and_test_loss_is_reported",
           "rankwise/bench/latency_quality.py",
           "best = lowest(sweep, lambda lr: sweep[lr][chosen_by])", 'best = lowest(sweep, lambda lr: sweep[lr]["eval_loss"])',
           "the FFBA quality bench picks each arm's lr on the test loss instead of validation"),
    Mutant("tests/test_bench_optimizers.py::test_verdict_uses_each_optimizers_best_run",
           "rankwise/bench/optimizers.py",
           'gap = l["test_loss"] / g["test_loss"] - 1', 'gap = l["val_loss"] / g["val_loss"] - 1',
           "the verdict's loss relative to GaLore is computed on validation instead of test"),
]


# ---- running one node --------------------------------------------------------------------------------
def _env(tree: Path) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "src"), env.get("PYTHONPATH")]))
    return env


def _check_imports_from(tree: Path) -> None:
    """Fail loudly unless `import rankwise` under this environment resolves into `tree`, not the real src/."""
    done = subprocess.run([sys.executable, "-c", "import rankwise; print(rankwise.__file__)"], cwd=tree,
                          env=_env(tree), capture_output=True, text=True, check=True)
    where = Path(done.stdout.strip()).resolve()
    if not where.is_relative_to(tree.resolve()):
        raise SystemExit(f"rankwise imports from {where}, not from the copy {tree}: the check would test the real tree")


def _pytest(tree: Path, node: str) -> tuple[str, str, float]:
    """Run one node in `tree`: (outcome, detail, seconds), outcome one of passed / failed / error."""
    report = tree / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--junitxml={report}", node]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "error", f"timed out after {TIMEOUT_S} s", time.monotonic() - start
    seconds = time.monotonic() - start
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    if done.returncode == 0:
        return "passed", tail[0], seconds
    failures = []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            for failure in case.findall("failure"):
                failures.append(f"{case.get('name')}: {(failure.get('message') or '').splitlines()[0][:300]}")
    if done.returncode == 1 and failures:
        return "failed", failures[0], seconds
    return "error", f"pytest exit {done.returncode}: {tail[0]}", seconds


# ---- the trees -------------------------------------------------------------------------------------
def _copy_tree(source: Path, dest: Path) -> Path:
    """Copy what the tests need from the repository (or from the snapshot) into the new folder `dest`."""
    dest.mkdir(parents=True)
    for name in COPIED:
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source / name, dest / name)
    return dest


def _source(tree: Path, mutant: Mutant) -> str:
    """The mutant's file in `tree`; stops the run unless its snippet occurs there exactly once."""
    text = (tree / "src" / mutant.file).read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.file}: the snippet for {mutant.test} occurs {count} times, not once:\n{mutant.old}")
    return text


def _plant(tree: Path, mutant: Mutant) -> None:
    (tree / "src" / mutant.file).write_text(_source(tree, mutant).replace(mutant.old, mutant.new))


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="run only mutants whose test, file or bug contains this text")
    ap.add_argument("--out", default="docs/results/mutants.json", help="where the JSON goes (relative to the repo)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(args.only in s for s in (m.test, m.file, m.bug))]
    if not chosen:
        raise SystemExit(f"no mutant matches {args.only!r}")

    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", *COPIED))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows, baselines, began = [], {}, time.monotonic()
    print(f"{len(chosen)} mutant(s) on {commit}{' + uncommitted changes' if dirty else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rankwise-mutants-") as tmp:
        pristine = _copy_tree(ROOT, Path(tmp) / "pristine")  # one snapshot: every run sees the same code
        for m in chosen:  # every snippet must be there before anything runs
            _source(pristine, m)
        _check_imports_from(pristine)
        for i, m in enumerate(chosen, 1):
            if m.test not in baselines:  # the unmutated node must pass, or its failure catches nothing
                outcome, detail, seconds = _pytest(pristine, m.test)
                baselines[m.test] = (outcome, detail, seconds)
                print(f"  baseline {m.test}: {outcome} ({seconds:.1f} s)", flush=True)
            base_outcome, base_detail, base_seconds = baselines[m.test]
            if base_outcome != "passed":
                result, detail, seconds = "error", f"fails unmutated: {base_detail}", 0.0
            else:
                tree = _copy_tree(pristine, Path(tmp) / f"mutant-{i}")
                _plant(tree, m)
                _check_imports_from(tree)
                outcome, detail, seconds = _pytest(tree, m.test)
                result = {"failed": "caught", "passed": "survived"}.get(outcome, "error")
                shutil.rmtree(tree)
            rows.append({"test": m.test, "file": f"src/{m.file}", "bug": m.bug, "result": result,
                         "seconds": round(seconds, 1), "baseline_seconds": round(base_seconds, 1), "detail": detail})
            print(f"[{i}/{len(chosen)}] {m.test} | {m.bug} | {result} | {seconds:.1f} s", flush=True)
            if result != "caught":
                print(f"    {detail}", flush=True)

    counts = {k: sum(r["result"] == k for r in rows) for k in ("caught", "survived", "error")}
    total = time.monotonic() - began
    print(f"{counts['caught']} caught, {counts['survived']} survived, {counts['error']} errored in {total:.0f} s",
          flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date, "commit": commit, "uncommitted_changes": dirty, "only": args.only,
                               "seconds": round(total, 1), **counts, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)
    return 1 if counts["survived"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
