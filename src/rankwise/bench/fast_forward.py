"""`rankwise bench fast-forward`: does Fast Forward cut the cost of reaching the baseline's loss?

From one initialisation (same seed, same data order) it trains, with the recipe:
    paper:   small constant LR, gradient accumulation (effective batch large next to the tiny set):
             baseline | FF (ours: doubling search, back-off) | FF reference (linear search, the paper's code)
    tuned:   an LR sweep of the baseline with the same cosine schedule and budget; FF at the best LR
    control: full fine-tuning (no adapter), constant LR: baseline | FF — the paper's negative control
Cost = measured FLOPs (torch FlopCounterMode) and wall seconds of train steps plus all FF work, up to
the first held-out evaluation at or below the baseline's best held-out loss (held-out evaluation is not
counted). Savings = 1 - cost_FF / cost_baseline. Writes a JSON (--out) and a PNG (--plot) of held-out
loss against cumulative FLOPs, FF stages marked.

Usage: rankwise bench fast-forward [--scale tiny|default] [--out R.json] [--plot R.png] [key=value ...]
key=value pairs are config overrides for every run (model=, data=, steps=, batch_size=, ff.interval=, ...);
the regimes' own LR and method always apply.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

from rankwise.bench import register, write_json
from rankwise.bench._harness import builtin_jsonl, config_settings, finished_runs, lowest, run_key, typed

SCALES = {
    # base: config for every run; paper / tuned / control: what each regime changes
    "tiny": {  # a 2-layer random Llama (rankwise.tiny); one thread: two oversubscribe a shared CPU badly
        "base": {"steps": 16, "batch_size": 8, "max_length": 128, "eval_every": 2, "eval_examples": 32,
                 "validation_examples": 8,
                 "rank": 8, "alpha": 16, "warmup_steps": 0, "precision": "fp32", "threads": 1},
        "paper": {"lr": 5e-4, "grad_accum": 2, "schedule": "constant"},
        "tuned": {"lrs": [3e-3, 1e-2, 3e-2], "schedule": "cosine", "warmup_steps": 2},
        "control": {"method": "full", "lr": 1e-4, "schedule": "constant", "steps": 12},
        "ff": {"interval": 4, "burn_in": 4, "tiny_examples": 8, "cap": 64},
        # the paper's search on the same tiny set, capped to keep the smoke test short
        "reference_ff": {"interval": 4, "burn_in": 4, "tiny_examples": 8, "search": "reference",
                         "backoff": 1.0, "cap": 64},
    },
    "default": {  # the embedded SmolLM2-135M-Instruct; about 40 minutes on a 2-core CPU
        "base": {"steps": 24, "batch_size": 8, "max_length": 256, "eval_every": 4, "eval_examples": 48,
                 "validation_examples": 64,
                 "rank": 16, "alpha": 32, "warmup_steps": 0, "precision": "bf16"},
        "paper": {"lr": 1e-4, "grad_accum": 4, "schedule": "constant"},
        "tuned": {"lrs": [3e-4, 1e-3, 3e-3], "schedule": "cosine", "warmup_steps": 2, "grad_accum": 2},
        "control": {"method": "full", "lr": 1e-5, "schedule": "constant", "steps": 12, "grad_accum": 2},
        "ff": {"interval": 4, "burn_in": 4, "tiny_examples": 8, "cap": 64},
        # the paper's search (uncapped) on the same tiny set, interval and burn-in as rankwise's
        "reference_ff": {"interval": 4, "burn_in": 4, "tiny_examples": 8, "search": "reference",
                         "backoff": 1.0, "cap": 1000},
    },
}


# ---- one run -----------------------------------------------------------------------------------------
def _train(overrides: dict, ff: dict | None, out: Path, say, reuse: dict) -> dict:
    """One recipe run in `out` (or, when `reuse` holds a finished run of this exact config, that run)."""
    from rankwise.config import load_config
    from rankwise.train.metrics import read_metrics
    from rankwise.recipes.train import train

    pairs = dict(overrides, out=str(out), overwrite=True, sample=False)
    if ff is not None:
        pairs["fast_forward"] = True
        pairs.update({f"ff.{k}": v for k, v in ff.items() if f"ff.{k}" not in pairs})  # user's ff.* win
    cfg = load_config(None, pairs)
    start = time.perf_counter()
    reused = run_key(config_settings(cfg.to_dict())) in reuse
    if reused:
        say(f"  (reusing the finished run in {out})")
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            summary = train(cfg, say=lambda *_: None)  # quiet: no progress bars or load messages
        if "stopped" in summary:
            raise KeyboardInterrupt(f"run {out.name} stopped by {summary['stopped']}")
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval" and "eval_loss" in r]
    final = evals[-1]  # the recipe's last test evaluation: held-out loss after the last step, with its costs
    summary = {"eval_loss": final["eval_loss"], "cum_flops": final["cum_flops"], "cum_seconds": final["cum_seconds"]}
    validation = next((r["validation_loss"] for r in records if "validation_loss" in r), None)
    stages = [r for r in records if r["kind"] == "ff"]
    steps = [r for r in records if r["kind"] == "train"]
    ff_flops = sum(r["flops"] for r in stages)
    ff_seconds = sum(r["seconds"] for r in stages)
    result = {
        "lr": cfg.lr, "method": cfg.method, "schedule": cfg.schedule, "grad_accum": cfg.grad_accum,
        "fast_forward": ff, "final_eval": summary["eval_loss"], "best_eval": min(r["eval_loss"] for r in evals),
        "validation_loss": validation,
        "cum_flops": summary["cum_flops"], "cum_seconds": summary["cum_seconds"],
        "curve": [[r["step"], r["cum_flops"], r["cum_seconds"], r["eval_loss"]] for r in evals],
        "stages": [{k: r[k] for k in ("step", "cum_flops", "accepted", "loss_before", "loss_after", "evals")}
                   for r in stages],
        "ff_evals": sum(r["evals"] for r in stages), "ff_steps_accepted": sum(r["accepted"] for r in stages),
        "ff_flops_share": ff_flops / max(summary["cum_flops"], 1.0),
        "ff_seconds_share": ff_seconds / max(summary["cum_seconds"], 1e-9),
        "train_step_flops": sum(r["flops"] for r in steps) / max(1, len(steps)),
        "train_step_seconds": sum(r["seconds"] for r in steps) / max(1, len(steps)),
        "eval_flops": ff_flops / max(1, sum(r["evals"] for r in stages)) if stages else None,
        "wall_seconds": None if reused else time.perf_counter() - start,
    }
    say(f"  {_label(result):<34} final {result['final_eval']:.4f} best {result['best_eval']:.4f} | "
        f"{result['cum_flops'] / 1e12:.3f} TFLOPs {result['cum_seconds']:.1f} s"
        + (f" | {len(stages)} stages, {result['ff_steps_accepted']:.1f} FF steps, {result['ff_evals']} evals"
           if stages else ""))
    return result


def _label(r: dict) -> str:
    ff = r["fast_forward"]
    kind = "baseline" if ff is None else "FF reference" if ff.get("search") == "reference" else "FF"
    return f"{r['method']} {kind} lr={r['lr']:g}"


def cost_to_reach(run: dict, target: float) -> dict | None:
    """Cost (FLOPs, seconds, optimizer steps) at the first held-out evaluation <= target; None if never."""
    for step, flops, seconds, loss in run["curve"]:
        if loss <= target + 1e-12:
            return {"step": step, "flops": flops, "seconds": seconds}
    return None


def compare(baseline: dict, ff: dict) -> dict:
    target = baseline["best_eval"]
    base, fast = cost_to_reach(baseline, target), cost_to_reach(ff, target)
    out = {"target": target, "baseline_cost": base, "ff_cost": fast, "reached": fast is not None}
    if fast is not None and base["flops"] > 0:
        out["flops_saved"] = 1 - fast["flops"] / base["flops"]
        out["seconds_saved"] = 1 - fast["seconds"] / base["seconds"]
        out["steps_saved"] = 1 - fast["step"] / max(1, base["step"])
    return out


def user_view(results: dict) -> dict | None:
    """The choice a user faces, from the paper and tuned regimes' runs: one Fast Forward run at an untuned lr
    (the paper regime's) against the lr sweep a tuned baseline needs. The sweep is paid in full (its lr is
    chosen after every run ends); FF pays up to its first held-out evaluation at or below the target, the
    higher (worse) of the two final losses, which both reach. None unless both regimes ran."""
    if "paper" not in results or "tuned" not in results:
        return None
    ff, sweep, best = results["paper"]["ff"], results["tuned"]["sweep"], results["tuned"]["baseline"]
    target = max(ff["final_eval"], best["final_eval"])
    reach = cost_to_reach(ff, target)  # its final evaluation at the latest
    view = {"target": target, "ff_lr": ff["lr"], "ff_final": ff["final_eval"], "ff_flops": ff["cum_flops"],
            "ff_seconds": ff["cum_seconds"], "ff_to_target": reach, "sweep_lrs": [r["lr"] for r in sweep],
            "sweep_best_lr": best["lr"], "sweep_final": best["final_eval"],
            "sweep_flops": sum(r["cum_flops"] for r in sweep), "sweep_seconds": sum(r["cum_seconds"] for r in sweep)}
    return view | {"flops_ratio": reach["flops"] / view["sweep_flops"],
                   "seconds_ratio": reach["seconds"] / view["sweep_seconds"]}


def user_view_text(view: dict) -> str:
    return (f"one FF run at lr {view['ff_lr']:g}: final {view['ff_final']:.4f}, {view['ff_flops'] / 1e12:.1f} TFLOPs, "
            f"{view['ff_seconds']:.0f} s | the {len(view['sweep_lrs'])}-lr sweep (best lr {view['sweep_best_lr']:g}): "
            f"final {view['sweep_final']:.4f}, {view['sweep_flops'] / 1e12:.1f} TFLOPs, {view['sweep_seconds']:.0f} s | "
            f"to {view['target']:.4f}: FF {view['ff_to_target']['flops'] / 1e12:.1f} TFLOPs = {view['flops_ratio']:.2f}x "
            f"the sweep's, {view['seconds_ratio']:.2f}x its seconds")


# ---- the three regimes -------------------------------------------------------------------------------
REGIMES = ("paper", "tuned", "control")


def run_all(scale: dict, user: dict, work: Path, say=print, regimes=REGIMES, reference: bool = True,
            reuse: dict | None = None) -> dict:
    """Every regime's runs in `work`; `reuse`: finished runs to keep (harness.finished_runs), by config."""
    base = {**scale["base"], **user}
    results = {}

    def runs(name, overrides, ff=None):
        merged = {**base, **{k: v for k, v in overrides.items() if k not in user or k in ("lr", "method")}}
        return _train(merged, ff, work / name, say, reuse or {})

    if "paper" in regimes:
        say("paper regime: small constant LR, large effective batch")
        p = scale["paper"]
        paper = {"baseline": runs("paper-base", p), "ff": runs("paper-ff", p, scale["ff"])}
        paper["ff_vs_baseline"] = compare(paper["baseline"], paper["ff"])
        if reference:
            paper["ff_reference"] = runs("paper-ref", p, scale["reference_ff"])
            paper["reference_vs_baseline"] = compare(paper["baseline"], paper["ff_reference"])
        results["paper"] = paper
    if "tuned" in regimes:
        results["tuned"] = _tuned(scale, runs, say)
    if "control" in regimes:
        say("negative control: Fast Forward on full fine-tuning")
        c = scale["control"]
        control = {"baseline": runs("control-base", c), "ff": runs("control-ff", c, scale["ff"])}
        control["ff_vs_baseline"] = compare(control["baseline"], control["ff"])
        results["control"] = control
    return results


def _tuned(scale: dict, runs, say) -> dict:

    say("tuned regime: baseline LR swept with the same schedule and budget")
    t = {k: v for k, v in scale["tuned"].items() if k != "lrs"}
    sweep = [runs(f"tuned-base-{lr:g}", {**t, "lr": lr}) for lr in scale["tuned"]["lrs"]]
    # chosen on the validation split's loss after the last step (the test curve is what is reported)
    best = lowest(sweep, lambda r: r["best_eval"] if r.get("validation_loss") is None else r["validation_loss"])
    if best["lr"] in (min(r["lr"] for r in sweep), max(r["lr"] for r in sweep)) and len(sweep) > 1:
        say(f"  note: the best LR {best['lr']:g} is at the edge of the sweep; widen it with --lrs")
    tuned = {"sweep": sweep, "baseline": best, "ff": runs("tuned-ff", {**t, "lr": best["lr"]}, scale["ff"])}
    tuned["ff_vs_baseline"] = compare(best, tuned["ff"])
    return tuned


# ---- report ------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def table(results: dict) -> str:
    rows = ["| regime | run | final loss | best loss | steps to target | FLOPs to target | s to target | "
            "FLOPs saved | time saved | FF evals | FF share of FLOPs | 1 eval / 1 step (FLOPs) |",
            "|" + "---|" * 12]
    for regime, res in results.items():
        pairs = [(res["baseline"], None), (res["ff"], res["ff_vs_baseline"])]
        if "ff_reference" in res:
            pairs.append((res["ff_reference"], res["reference_vs_baseline"]))
        target = res["ff_vs_baseline"]["target"]
        for run, cmp in pairs:
            cost = cost_to_reach(run, target)
            reach = ["missed"] * 3 if cost is None else [
                str(cost["step"]), f"{cost['flops'] / 1e12:.4f} T", f"{cost['seconds']:.1f}"]
            ff = [""] * 5
            if cmp is not None:
                ratio = run["eval_flops"] / run["train_step_flops"] if run["eval_flops"] else None
                ff = [_pct(cmp.get("flops_saved")), _pct(cmp.get("seconds_saved")), str(run["ff_evals"]),
                      f"{100 * run['ff_flops_share']:.0f}%", "-" if ratio is None else f"{ratio:.2f}"]
            rows.append("| " + " | ".join([regime, _label(run), f"{run['final_eval']:.4f}", f"{run['best_eval']:.4f}",
                                           *reach, *ff]) + " |")
    if "tuned" in results:
        sweep = ", ".join(f"lr {r['lr']:g}: best {r['best_eval']:.4f}" for r in results["tuned"]["sweep"])
        rows.append(f"\ntuned sweep (cosine): {sweep}")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2))
    for ax, (regime, res) in zip(np.atleast_1d(axes), results.items()):
        runs = [("baseline", res["baseline"], "C0"), ("FF", res["ff"], "C1")]
        if "ff_reference" in res:
            runs.append(("FF reference", res["ff_reference"], "C2"))
        for name, run, color in runs:
            x = [c[1] / 1e12 for c in run["curve"]]
            y = [c[3] for c in run["curve"]]
            ax.plot(x, y, "o-", color=color, ms=3, label=f"{name} (lr {run['lr']:g})")
            for s in run["stages"]:
                hit = s["accepted"] > 0
                ax.plot(s["cum_flops"] / 1e12, np.interp(s["cum_flops"] / 1e12, x, y), "^" if hit else "x",
                        color=color, ms=7 if hit else 5, alpha=0.9 if hit else 0.5)
        ax.axhline(res["ff_vs_baseline"]["target"], color="grey", ls=":", lw=1, label="baseline's best")
        ax.set_title(f"{regime} ({res['baseline']['method']}, {res['baseline']['schedule']} LR)")
        ax.set_xlabel("cumulative TFLOPs (train steps + FF work, measured)")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="^ FF stage accepted, x empty", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rankwise bench fast-forward", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="write the held-out loss vs FLOPs plot here (PNG)")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs found in --workdir with the same config (continue a bench)")
    parser.add_argument("--regimes", default=",".join(REGIMES),
                        help="comma-separated subset of: " + ", ".join(REGIMES))
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the paper's own (linear) search in the paper regime")
    parser.add_argument("--lrs", help="comma-separated LRs for the tuned regime's baseline sweep")
    parser.add_argument("--report", metavar="RESULTS.json",
                        help="train nothing: print the tables of a results file this bench wrote (and --plot it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.report:
        import json

        results = json.loads(Path(args.report).read_text())["results"]
        print(table(results))
        if view := user_view(results):
            print("\nthe user's choice: " + user_view_text(view))
        if args.plot:
            plot(results, Path(args.plot))
        return 0
    regimes = [r for r in args.regimes.split(",") if r]
    if not regimes or set(regimes) - set(REGIMES):
        parser.error(f"--regimes takes a comma-separated subset of {', '.join(REGIMES)}, got {args.regimes!r}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from rankwise.config import load_config

    user = typed(args.overrides)  # the CLI's own value parsing
    scale = SCALES[args.scale]
    if args.lrs:
        scale = {**scale, "tuned": {**scale["tuned"], "lrs": [float(x) for x in args.lrs.split(",") if x]}}
    load_config(None, {**scale["base"], **user})  # bad keys fail now
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        if args.scale == "tiny" and "model" not in user:
            from rankwise.tiny import make_tiny_model_dir

            user["model"] = str(make_tiny_model_dir(work / "tiny-model"))
        if user.get("data", "stdlib-docstrings") == "stdlib-docstrings":  # the same split, loaded in ms
            user["data"] = builtin_jsonl(work / "stdlib-docstrings.jsonl")
        import torch

        threads = user.get("threads", scale["base"].get("threads", 0)) or torch.get_num_threads()
        print(f"fast-forward bench, scale {args.scale}, model {user.get('model', 'default')}, {threads} threads")
        reuse = finished_runs(work) if args.reuse and args.workdir else {}
        results = run_all(scale, user, work, regimes=regimes, reference=not args.no_reference, reuse=reuse)
    report = table(results)
    print(report)
    if view := user_view(results):
        print("\nthe user's choice: " + user_view_text(view))
    elapsed = time.perf_counter() - started
    print(f"total wall time {elapsed:.0f} s")
    payload = {"scale": args.scale, "overrides": {k: v for k, v in user.items() if k != "data"},
               "settings": scale, "results": results, "user_view": user_view(results), "elapsed_seconds": elapsed,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        write_json(args.out, payload, indent=1)
    if args.plot:
        plot(results, Path(args.plot))
    return 0


register("fast-forward", main)
