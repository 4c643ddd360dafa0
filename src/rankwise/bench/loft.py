"""`rankwise bench loft`: LoFT against LoRA+AdamW, DoRA and full fine-tuning, same steps and data.

Each configuration trains in its own forked process, so its memory is its own: after the model and
data are loaded, freed memory is returned to the OS and the kernel's peak-RSS mark is reset
(/proc/self/clear_refs), and the peak RSS reached during the training steps is read back (VmHWM).
That peak is the whole process (weights, activations, gradients, optimizer state), like a GPU's
max_memory_allocated; tracemalloc would miss it because torch allocates outside Python. On CUDA the
torch allocator's peak is reported instead. Optimizer state bytes are counted exactly as well.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rankwise.bench import positive_numbers, proc_kib, register, reset_peak_rss, write_json
from rankwise.bench._harness import best_per, builtin_jsonl, finished_rows, in_child, run_key, selection_loss

SCALES = {  # steps, batch, max_length, eval_examples, full-FT/LoFT lr, LoRA sweep "lr:alpha/r", memory check
    "tiny": dict(steps=20, batch=8, max_length=128, eval_examples=32, lr=1e-3, lr_simple=4e-3, ranks="1,4",
                 lora_sweep="1e-3:2,4e-3:2", memory_rank=0, examples=600, validation_examples=8),
    "default": dict(steps=60, batch=8, max_length=256, eval_examples=64, lr=1e-4, lr_simple=5e-4, ranks="1,2,4,16",
                    lora_sweep="2e-4:2,5e-4:2,1e-3:2,5e-4:1", memory_rank=16, examples=0, validation_examples=64),
}


def _one(overrides: list[str], want_start: bool, desc: str) -> dict:
    """In a child process: build the run, train (a progress bar named `desc`), measure."""
    import torch
    from tqdm.auto import tqdm

    from rankwise.config import load_config
    from rankwise.optim import optimizer_state_bytes
    from rankwise.recipes.train import build_run, train_step

    cfg = load_config(None, overrides)
    run = build_run(cfg, say=lambda *a: None)
    start_loss = run.test_loss() if want_start else None
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    rss_before = proc_kib("VmRSS") / 1024
    seconds = []
    for _ in tqdm(range(cfg.steps), desc=desc, unit="step", leave=False, dynamic_ncols=True):
        seconds.append(train_step(run)["seconds"])
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else proc_kib("VmHWM") / 1024
    return {"eval_loss": run.test_loss(), "validation_loss": run.validation_loss(), "eval_loss_start": start_loss,
            "step_s": statistics.mean(seconds[1:] or seconds), "peak_mb": peak,
            "peak_kind": "cuda_max_allocated" if cuda else "process_peak_rss",
            "rss_before_mb": rss_before, "optimizer_state_mb": optimizer_state_bytes(run.optimizer) / 2 ** 20,
            "trainable": sum(p.numel() for p in run.trainable()), "steps": cfg.steps}


def _probe_device(name: str):
    """In a child process: --device resolved, or its one-line error (the parent never touches CUDA: it forks)."""
    from rankwise.runtime import resolve_device

    try:
        return str(resolve_device(name))
    except ValueError as e:
        return {"error": str(e)}


def configurations(ranks: list[int], full_lrs: list[float], loft_lrs: list[float], simple_lrs: list[float],
                   lora_sweep: list[tuple[float, float]]):
    """(label, rank, overrides) for every run of the comparison. Every method gets an lr sweep (LoFT and
    LoFT simple are alpha-invariant, so alpha is not swept for them). DoRA's overrides are None: it runs
    at the best LoRA setting of its rank, known once the LoRA sweep before it has run (`dora_at`)."""
    out = [(f"full lr={lr:g}", None, ["method=full", f"lr={lr}"]) for lr in full_lrs]
    for r in ranks:
        lora = ["method=lora", f"rank={r}"]
        for loft_lr in loft_lrs:
            out.append((f"loft lr={loft_lr:g}", r, lora + ["optimizer=loft", f"lr={loft_lr}", f"alpha={r}"]))
        for simple_lr in simple_lrs:
            out.append((f"loft-simple lr={simple_lr:g}", r, lora + ["optimizer=loft", f"lr={simple_lr}",
                                                                   f"alpha={r}", "optimizer_args.simple=true"]))
        for lora_lr, alpha_per_r in lora_sweep:
            out.append((f"lora lr={lora_lr:g} a={alpha_per_r:g}r", r,
                        lora + [f"lr={lora_lr}", f"alpha={alpha_per_r * r}"]))
        out.append(("dora", r, None))
    return out


def dora_at(rows: list[dict], rank: int, fallback: tuple[float, float]) -> tuple[str, list[str]]:
    """DoRA's label and overrides: the lr and alpha of the best finished LoRA run at `rank` (else `fallback`)."""
    best = _best([r for r in rows if r["rank"] == rank and "eval_loss" in r]).get("lora")
    if best is None:
        lr, alpha = fallback[0], fallback[1] * rank
    else:  # the row's recorded overrides (maybe from a --reuse'd file): the only place its lr and alpha are
        setting = dict(o.split("=", 1) for o in best["overrides"])
        lr, alpha = float(setting["lr"]), float(setting["alpha"])
    return f"dora lr={lr:g} a={alpha / rank:g}r", ["method=dora", f"rank={rank}", f"lr={lr}", f"alpha={alpha:g}"]


def _best(rows: list[dict]) -> dict[str, dict]:
    """{kind (full, lora, loft, loft-simple, dora): its row with the lowest validation loss (harness.
    selection_loss; its test loss is what is reported)}."""
    return best_per(rows, lambda r: r["label"].split(" ")[0], selection_loss)


def summarize(rows: list[dict]) -> list[dict]:
    """Per rank: the best of each sweep (chosen on the held-out set: the same favour for every method), and
    the share of the gap between the best LoRA and full fine-tuning that the best LoFT closes."""
    best_full = _best([r for r in rows if "eval_loss" in r]).get("full")
    full = best_full and best_full["eval_loss"]
    out = []
    for rank in sorted({r["rank"] for r in rows if r["rank"] is not None}):
        best = _best([r for r in rows if r["rank"] == rank and "eval_loss" in r])
        line = {"rank": rank, "full": full, "full_label": best_full and best_full["label"]}
        for kind in ("lora", "loft", "loft-simple", "dora"):
            row = best.get(kind)
            line[kind], line[f"{kind}_label"] = row and row["eval_loss"], row and row["label"]
        lora, loft = line["lora"], line["loft"]
        if full is not None and lora is not None and loft is not None and lora > full:
            line["gap_closed"] = (lora - loft) / (lora - full)
        out.append(line)
    return out


_reusable = finished_rows  # --reuse: the finished runs of an earlier --out file with the same settings


def memory_check(common: list[str], rank: int, steps: int) -> list[dict]:
    """Peak training memory at one rank: LoFT and LoFT simple relative to LoRA+AdamW."""
    runs = {"lora": ["method=lora", f"rank={rank}"],
            "loft": ["method=lora", f"rank={rank}", "optimizer=loft", "clip=0"],
            "loft-simple": ["method=lora", f"rank={rank}", "optimizer=loft", "clip=0", "optimizer_args.simple=true"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in runs.items():
            over = common + extra + [f"steps={steps}", f"out={tmp}/mem-{label}", "eval_examples=8"]
            rows.append({"label": label, "rank": rank, **in_child(_one, over, False, f"memory {label} r={rank}")})
    base = rows[0].get("peak_mb")
    for row in rows:
        if base and "peak_mb" in row:
            row["peak_vs_lora"] = row["peak_mb"] / base
    return rows


def _print_rows(rows: list[dict]) -> None:
    print(f"{'config':<24}{'rank':>5}{'held-out':>10}{'step s':>9}{'peak MB':>9}{'state MB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<24}{str(r['rank'] or '-'):>5}  ERROR {r['error']}")
            continue
        print(f"{r['label']:<24}{str(r['rank'] or '-'):>5}{r['eval_loss']:>10.4f}{r['step_s']:>9.2f}"
              f"{r['peak_mb']:>9.0f}{r['optimizer_state_mb']:>10.1f}")


def replot(ap: argparse.ArgumentParser, source: str, png: str | None) -> int:
    """--replot: the picture of a finished (or stopped) bench's file, without running anything."""
    if not png:
        ap.error("--replot needs --plot: the PNG to draw")
    try:
        result = json.loads(Path(source).read_text())
        rows = result["rows"]
    except (OSError, ValueError, KeyError) as e:
        ap.error(f"--replot: {source} is not a readable `rankwise bench loft` result ({e})")
    from rankwise.bench.loft_plot import plot_sweeps

    shape = f"{result.get('steps', '?')} steps x {result.get('batch_size', '?')}, {result.get('precision', '?')}"
    ranks = plot_sweeps(rows, Path(png), f"LoFT bench, {result.get('scale', '?')}: {shape}")
    print(f"plot: {png} (ranks {', '.join(map(str, ranks))}, {len(rows)} runs from {source})")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rankwise bench loft", description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="default")
    ap.add_argument("--ranks", help="comma-separated LoRA ranks")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--eval-examples", type=int)
    ap.add_argument("--lr", help="full fine-tuning's lr sweep, comma-separated (also LoFT's, unless --loft-lrs)")
    ap.add_argument("--loft-lrs", help="LoFT's lr sweep, comma-separated (default: --lr)")
    ap.add_argument("--lr-simple", help="LoFT simple's lr sweep, comma-separated: its Adam step is taken in "
                    "factor space, like LoRA's")
    ap.add_argument("--lora-sweep", help="LoRA+AdamW settings, 'lr:alpha/r,...' (DoRA runs at the best of them)")
    ap.add_argument("--methods", default="full,loft,loft-simple,lora,dora",
                    help="which of full, loft, loft-simple, lora, dora to run (comma-separated)")
    ap.add_argument("--memory-rank", type=int, help="rank of the memory check (0 skips it; default 16, tiny 0)")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true", help="only the memory check")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where every run trains (auto: cuda when present; peak memory is then the allocator's)")
    ap.add_argument("--seed", type=int, default=0, help="adapter initialisation and data order of every run "
                    "(the held-out set stays the same); rerun with another seed to see the spread")
    ap.add_argument("--out", help="write all results as JSON here (after every run, so a stopped bench keeps them)")
    ap.add_argument("--reuse", action="store_true", help="keep the finished runs already in --out (same settings)")
    ap.add_argument("--plot", help="draw held-out loss against lr, a panel per rank, into this PNG")
    ap.add_argument("--replot", metavar="JSON", help="only draw --plot from the runs in this earlier --out file "
                    "(trains nothing)")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(ap, args.replot, args.plot)
    if args.reuse and not args.out:
        ap.error("--reuse needs --out: the file whose finished runs it keeps")
    if args.seed < 0:
        ap.error(f"--seed: a non-negative whole number, got {args.seed}")
    scale = SCALES[args.scale]
    try:
        ranks = positive_numbers("--ranks", args.ranks or scale["ranks"], int)
        sweep_text = args.lora_sweep or scale["lora_sweep"]
        if not all(item.count(":") == 1 for item in sweep_text.split(",")):
            raise ValueError(f"--lora-sweep: expected 'lr:alpha/r,...', got {sweep_text!r}")
        sweep = [tuple(positive_numbers("--lora-sweep", item.replace(":", ","))) for item in sweep_text.split(",")]
        lrs = positive_numbers("--lr", args.lr or scale["lr"])
        loft_lrs = positive_numbers("--loft-lrs", args.loft_lrs) if args.loft_lrs else lrs
        simple_lrs = positive_numbers("--lr-simple", args.lr_simple or scale["lr_simple"])
    except ValueError as e:
        ap.error(str(e))
    steps, batch = args.steps or scale["steps"], args.batch_size or scale["batch"]
    memory_rank = scale["memory_rank"] if args.memory_rank is None else args.memory_rank
    import rankwise.recipes.train  # noqa: F401  imported once here; the forked runs inherit it
    device = in_child(_probe_device, args.device)
    if isinstance(device, dict):
        ap.error(device["error"])
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = "default"
        if args.scale == "tiny":
            from rankwise.tiny import make_tiny_model_dir

            model = in_child(lambda: str(make_tiny_model_dir(f"{tmp}/tiny-model")))  # torch work: not here
        common = [f"model={model}", f"batch_size={batch}", f"max_length={args.max_length or scale['max_length']}",
                  f"eval_examples={args.eval_examples or scale['eval_examples']}",
                  f"validation_examples={scale['validation_examples']}", "eval_every=0", "sample=false", "count_flops=false",
                  f"precision={args.precision}", f"threads={args.threads}", f"seed={args.seed}"]
        if args.device != "auto":  # (auto: the config's default, so earlier --out files stay reusable)
            common.append(f"device={device}")
        if scale["examples"]:
            common.append(f"data={builtin_jsonl(Path(tmp) / 'data.jsonl', scale['examples'])}")
        settings = [c.replace(tmp, "<tmp>") for c in common] + [f"steps={steps}"]  # what --reuse must match
        rows, done = [], finished_rows(args.out, settings) if args.reuse else {}
        if not args.skip_quality:
            methods = set(args.methods.split(","))
            runs = [c for c in configurations(ranks, lrs, loft_lrs, simple_lrs, sweep) if c[0].split(" ")[0] in methods]
            for i, (label, rank, extra) in enumerate(runs):
                if extra is None:
                    label, extra = dora_at(rows, rank, sweep[0])
                result = done.get(run_key(extra))
                if result is None:
                    over = common + extra + [f"steps={steps}", f"out={tmp}/run-{i}"]
                    result = in_child(_one, over, i == 0, f"[{i + 1}/{len(runs)}] {label} r={rank}")
                rows.append({**result, "label": label, "rank": rank, "overrides": extra})
                print(f"[{time.time() - started:6.0f}s] {label} r={rank}: "
                      + (result.get("error") or f"held-out {result['eval_loss']:.4f}"), flush=True)
                if args.out:  # partial results survive a long run being stopped
                    write_json(args.out, {"partial": True, "common": settings, "steps": steps, "rows": rows})
        memory = memory_check(common, memory_rank, args.memory_steps) if memory_rank else []
    print(f"\nLoFT bench, scale {args.scale}: {steps} steps, batch {batch}, {args.precision} on {device}, "
          f"{time.time() - started:.0f} s in all")
    if rows:
        _print_rows(rows)
        start = rows[0].get("eval_loss_start")
        print(f"\nheld-out loss before training: {start:.4f}" if start is not None else "")
        print(f"{'rank':>4}{'full':>9}{'LoRA*':>9}{'DoRA':>9}{'LoFT*':>9}{'simple*':>9}{'gap closed':>12}")
        summary = summarize(rows)
        fmt = lambda v: f"{v:>9.4f}" if v is not None else f"{'-':>9}"  # noqa: E731
        for s in summary:
            gap = f"{100 * s['gap_closed']:>11.0f}%" if "gap_closed" in s else f"{'-':>12}"
            print(f"{s['rank']:>4}{fmt(s['full'])}{fmt(s['lora'])}{fmt(s['dora'])}{fmt(s['loft'])}"
                  f"{fmt(s['loft-simple'])}{gap}")
        print("* = best of its lr sweep on the same held-out set (LoRA: lr and alpha)")
        if args.plot:
            from rankwise.bench.loft_plot import plot_sweeps

            plot_sweeps(rows, Path(args.plot), f"LoFT bench, {args.scale}: {steps} steps x {batch}, {args.precision}")
            print(f"plot: {args.plot}")
    else:
        summary = []
    if memory:
        print(f"\nmemory check at r={memory_rank}, {args.memory_steps} steps:")
        _print_rows(memory)
        for row in memory:
            if "peak_vs_lora" in row:
                print(f"  {row['label']}: peak {row['peak_vs_lora']:.3f}x LoRA+AdamW")
    if args.out:
        write_json(args.out, {"scale": args.scale, "common": settings, "device": device, "steps": steps,
                              "batch_size": batch,
                          "precision": args.precision, "lrs": lrs, "loft_lrs": loft_lrs, "simple_lrs": simple_lrs,
                          "lora_sweep": sweep, "rows": rows, "summary": summary, "memory": memory})
    failed = [r for r in rows + memory if "error" in r]
    return 1 if failed else 0


register("loft", main)
