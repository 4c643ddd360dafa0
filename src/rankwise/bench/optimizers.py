"""Pre-training from scratch with low-rank optimizer state: AdamW vs GaLore (rank r) vs LoRA-Pre (rank r/8),
with Muon (full-rank momentum, AdamW on the rest) and APOLLO (rank r, like GaLore) as further baselines.

Same model, data (stdlib source), steps and seed for every optimizer; a small learning-rate sweep each;
the best validation loss per optimizer, the bytes in its state tensors (all, and the attention/MLP
matrices alone) and peak memory (CUDA: max allocated; CPU: peak RSS growth of a forked child per run).
Claim checked (LoRA-Pre paper): LoRA-Pre at rank r/8 reaches GaLore-at-rank-r validation loss within 1%
with at most 1/6 of GaLore's optimizer state.

    rankwise bench optimizers --scale tiny --out results/optimizers-tiny.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import resource
import time
from pathlib import Path

import torch

from rankwise.bench import optimizers_finetune as finetune
from rankwise.bench import positive_numbers, proc_kib, register, write_json
from rankwise.bench._harness import best_per, in_child
from rankwise.recipes.pretrain import PretrainConfig, build_model, parse_overrides, prepare_data, run

OPTIMIZERS = ("adamw", "galore", "lorapre", "lorapre-muon", "muon", "apollo")
NO_RANK = ("adamw", "muon")  # full-size state: no rank, no update scale
LOW_RANK = ("galore", "lorapre", "lorapre-muon")  # the optimizers with an update scale on their matrices
PARITY_SCALES = dict.fromkeys(LOW_RANK, [0.25])  # GaLore's published scale, the LoRA-Pre paper's parity setup
# muon's step is RMS-matched to AdamW's (adjust_lr_fn="match_rms_adamw") and APOLLO's is Adam's step rescaled
# channel-wise (scale 1, its README's): both take AdamW's grid; APOLLO runs at GaLore's rank and gap
SCALES = {
    # tiny: < 2 minutes on a shared 2-core CPU; GaLore r=16 vs LoRA-Pre r=2 on 64-wide matrices
    "tiny": dict(model="hidden=64 layers=2 heads=4 kv_heads=2 intermediate=172 vocab=1024 corpus_mb=3 seq_len=128 "
                       "batch_size=8 steps=60 warmup_steps=6", rank=16, gap=20,
                 lrs={"adamw": [3e-3, 1e-2], "galore": [1e-2, 3e-2], "lorapre": [1e-2, 3e-2],
                      "lorapre-muon": [1e-2, 3e-2], "muon": [3e-3, 1e-2], "apollo": [3e-3, 1e-2]},
                 update_scales=PARITY_SCALES),
    # default: a 2.2M-parameter Llama (192 wide, 4 blocks), GaLore r=48 vs LoRA-Pre r=6
    "default": dict(model="hidden=192 layers=4 heads=4 kv_heads=4 intermediate=512 vocab=2048 corpus_mb=12 "
                          "seq_len=128 batch_size=16 steps=150 warmup_steps=15", rank=48, gap=50,
                    lrs={"adamw": [3e-3, 1e-2], "galore": [1e-2, 3e-2], "lorapre": [1e-2, 3e-2],
                         "lorapre-muon": [3e-2], "muon": [3e-3, 1e-2], "apollo": [3e-3, 1e-2]},
                    update_scales=PARITY_SCALES),
}


def configs(scale: dict, optimizers: list[str], steps: int | None, threads: int, out: Path,
            device: str = "auto") -> list[PretrainConfig]:
    """One PretrainConfig per (optimizer, lr, update scale): GaLore and APOLLO at rank r, LoRA-Pre at rank r/8,
    AdamW and Muon full.

    GaLore and LoRA-Pre scale their matrix updates (by default 0.25: GaLore's published setting, the
    LoRA-Pre paper's parity setup), so at one lr their embeddings/norms/head (plain Adam) step alike;
    sweeping the scale too decouples the matrices' step from the rest's."""
    base = scale["model"].split() + [f"threads={threads}", "eval_every=0", "progress=false", "save=false",
                                     "overwrite=true", f"device={device}"] + ([f"steps={steps}"] if steps else [])
    r = scale["rank"]
    extra = {"adamw": [], "galore": [f"rank={r}", f"optimizer_args.update_proj_gap={scale['gap']}"],
             "lorapre": [f"rank={max(1, r // 8)}"], "lorapre-muon": [f"rank={max(1, r // 8)}"], "muon": [],
             "apollo": [f"rank={r}", f"optimizer_args.update_proj_gap={scale['gap']}"]}
    out_cfgs = []
    for name in optimizers:
        for lr in scale["lrs"][name]:
            for s in scale["update_scales"].get(name, [None]):
                tag = f"{name}-lr{lr:g}" + (f"-s{s:g}" if s is not None else "")
                update = [f"optimizer_args.scale={s}"] if s is not None else []
                out_cfgs.append(parse_overrides(base + extra[name] + update + [f"optimizer={name}", f"lr={lr}",
                                                                              f"out={out / tag}"]))
    return out_cfgs


def parse_grid(text: str, what: str, known: tuple[str, ...] = OPTIMIZERS) -> dict[str, list[float]]:
    """'adamw=1e-3,3e-3;lorapre=3e-3' -> {'adamw': [0.001, 0.003], 'lorapre': [0.003]}; a clear error otherwise."""
    grid = {}
    for item in filter(None, text.split(";")):
        name, _, values = item.partition("=")
        try:
            grid[name.strip()] = positive_numbers(f"{what} {name.strip()}", values)
        except ValueError as e:
            raise SystemExit(f"{what}: '{item}' is not optimizer=number,number,... ({e})") from None
        if name.strip() not in known:
            raise SystemExit(f"{what}: unknown optimizer '{name.strip()}' (known: {', '.join(known)})")
    return grid


def _with_peak_growth(fn, *args) -> dict:
    """fn(*args)'s summary plus the peak RSS it added: a forked child's high-water mark starts at its RSS at fork."""
    start = proc_kib("VmRSS") * 1024
    summary = fn(*args)
    summary["peak_rss_growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    return summary


def isolated(fn, *args) -> dict:
    """fn(*args) -> summary dict, run in a forked child so peak RSS is per run (in-process off Linux/CUDA)."""
    if not Path("/proc/self/statm").exists() or torch.cuda.is_available():
        gc.collect()  # an earlier run's leftovers out of this one's CUDA peak (max_memory_allocated)
        return fn(*args)
    summary = in_child(_with_peak_growth, fn, *args)
    if "error" in summary:
        raise RuntimeError(summary["error"])
    return summary


def _pretrain(cfg: PretrainConfig) -> dict:
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    return run(cfg, say=lambda *_: None)


def best_per_optimizer(rows: list[dict]) -> dict[str, dict]:
    """{optimizer: its run with the lowest validation loss} (its test loss is what is reported)."""
    return best_per(rows, "optimizer", "val_loss")


def verdict(best: dict[str, dict]) -> dict:
    """The paper's claim, measured for each LoRA-Pre variant present: loss within 1% of GaLore's and
    optimizer state at most 1/6 of GaLore's (all state, and the attention/MLP matrices alone)."""
    if "galore" not in best:
        return {}
    g, out = best["galore"], {}
    for name in ("lorapre", "lorapre-muon"):
        if name in best:
            l = best[name]
            gap = l["test_loss"] / g["test_loss"] - 1  # on the test files; each was chosen on validation
            state, matrices = (l["optimizer_state_bytes"] / g["optimizer_state_bytes"],
                               l["matrix_state_bytes"] / g["matrix_state_bytes"])
            out[name] = {"test_loss_rel_to_galore": gap, "loss_within_1pct": gap <= 0.01, "state_ratio_all": state,
                         "state_ratio_matrices": matrices, "matrices_at_most_one_sixth": matrices <= 1 / 6,
                         "all_at_most_one_sixth": state <= 1 / 6}
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'optimizer':<13} {'rank':>4} {'lr':>7} {'scale':>6} {'val loss':>9} {'test loss':>9} {'state MiB':>9} "
             f"{'matrix MiB':>10} {'peak MiB':>9} {'s/step':>7}"]
    for r in rows:
        peak = r.get("peak_cuda_bytes") or r.get("peak_rss_growth_bytes") or 0
        lines.append(f"{r['optimizer']:<13} {r['rank'] if r['optimizer'] not in NO_RANK else '-':>4} {r['lr']:>7.0e} "
                     f"{r.get('update_scale') or '-':>6} {r['val_loss']:>9.4f} {r['test_loss']:>9.4f} {r['optimizer_state_bytes'] / 2**20:>9.3f} "
                     f"{r['matrix_state_bytes'] / 2**20:>10.3f} {peak / 2**20:>9.1f} "
                     f"{r['train_seconds'] / max(1, r['steps']):>7.3f}")
    return "\n".join(lines)


def parse_betas(text: str) -> list[float]:
    """'0.9,0.95' -> [0.9, 0.95]; SystemExit unless two numbers (their range is the recipe's check, run on
    every setting before the first run trains)."""
    try:
        betas = [float(v) for v in text.split(",")]
    except ValueError:
        betas = []
    if len(betas) != 2:
        raise SystemExit(f"--betas: expected two numbers such as 0.9,0.95, got {text!r}")
    return betas


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rankwise bench optimizers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--optimizers", help=f"comma-separated, default all: {','.join(OPTIMIZERS)} "
                        f"(with --finetune: {','.join(finetune.DEFAULT)}; known: {','.join(finetune.METHODS)})")
    parser.add_argument("--steps", type=int, help="override the scale's step count")
    parser.add_argument("--lrs", help="replace the scale's lr grid, e.g. 'adamw=1e-3,3e-3;lorapre=3e-3'")
    parser.add_argument("--update-scales", help="sweep the matrix-update scale too (default 0.25 for galore and "
                        "both lorapre, apollo's own 1), e.g. 'lorapre=0.0625,0.25;galore=0.125,0.25'")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default 1 for pre-training, the "
                        "fastest on a busy box for these small models; all cores for --finetune)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where every run trains (auto: cuda when present; peak memory is then "
                             "torch.cuda.max_memory_allocated)")
    parser.add_argument("--workdir", default="runs/bench-optimizers")
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--finetune", action="store_true",
                        help="instead: fine-tune (tiny model, or the embedded default) with LoRA vs LoRA-Pre "
                             "at the same optimizer-state bytes, each lr-swept (--lrs 'lora=...;lorapre=...')")
    parser.add_argument("--betas", help="with --finetune: the same AdamW betas for every method, e.g. 0.9,0.95")
    parser.add_argument("--curve-every", type=int, default=0, metavar="K",
                        help="with --finetune: score the test set every K steps and report each method's steps to "
                             "LoRA's final test loss")
    args = parser.parse_args(argv)
    betas = parse_betas(args.betas) if args.betas else None
    if (betas or args.curve_every) and not args.finetune:
        raise SystemExit("--betas and --curve-every are for --finetune")
    if args.curve_every < 0:
        raise SystemExit(f"--curve-every: expected a step count >= 0, got {args.curve_every}")
    from rankwise.runtime import resolve_device

    try:  # (runs go in-process when CUDA is present, so resolving here forks nothing after CUDA)
        device = str(resolve_device(args.device))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.finetune:
        if args.update_scales:
            raise SystemExit("--update-scales is for pre-training; --finetune sweeps lr only")
        methods = [n for n in (args.optimizers or ",".join(finetune.DEFAULT)).split(",") if n]
        if unknown := [n for n in methods if n not in finetune.METHODS]:
            raise SystemExit(f"--optimizers: unknown {', '.join(unknown)} with --finetune "
                             f"(known: {', '.join(finetune.METHODS)})")
        lrs = parse_grid(args.lrs, "--lrs", finetune.METHODS) if args.lrs else {}
        return finetune.main(args.scale, lrs, args.steps, args.threads or 0, args.workdir, args.out, isolated,
                             methods, device, betas, args.curve_every)
    args.threads = args.threads or 1
    scale = SCALES[args.scale]
    if args.lrs:
        scale = scale | {"lrs": scale["lrs"] | parse_grid(args.lrs, "--lrs")}
    if args.update_scales:
        grid = parse_grid(args.update_scales, "--update-scales")
        if no_scale := [n for n in NO_RANK if n in grid]:
            raise SystemExit(f"--update-scales: {', '.join(no_scale)} has no update scale (full-size state)")
        scale = scale | {"update_scales": scale["update_scales"] | grid}
    names = [n for n in (args.optimizers or ",".join(OPTIMIZERS)).split(",") if n]
    if unknown := [n for n in names if n not in OPTIMIZERS]:
        raise SystemExit(f"--optimizers: unknown {', '.join(unknown)} (known: {', '.join(OPTIMIZERS)})")
    cfgs = configs(scale, names, args.steps, args.threads, Path(args.workdir) / args.scale, device)
    started = time.perf_counter()
    prepare_data(cfgs[0])  # tokenizer and token streams once, before forking
    build_model(cfgs[0], 300)  # import the model code once too, so a child's RSS growth is its run alone
    rows = []
    for cfg in cfgs:
        summary = isolated(_pretrain, cfg)
        rows.append(summary)
        rank = cfg.rank if cfg.optimizer not in NO_RANK else "-"
        update = f" scale {cfg.optimizer_args['scale']:g}" if "scale" in cfg.optimizer_args else ""
        print(f"{cfg.optimizer:<13} rank {rank:>3} lr {cfg.lr:<7g}{update} val loss {summary['val_loss']:.4f} "
              f"test loss {summary['test_loss']:.4f} "
              f"({summary['train_seconds']:.0f} s)", flush=True)
    best = best_per_optimizer(rows)
    result = {"bench": "optimizers", "scale": args.scale, "config": dataclasses.asdict(cfgs[0]) | {"optimizer": None},
              "galore_rank": scale["rank"], "lorapre_rank": max(1, scale["rank"] // 8),
              "runs": rows, "best": best, "verdict": verdict(best),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs"
                         + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
              "device": device,
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "wall_seconds": time.perf_counter() - started}
    print("\nall runs:\n" + table(rows) + "\n\nbest lr per optimizer:\n" + table(list(best.values())))
    for name, checks in result["verdict"].items():
        print(f"{name} vs galore: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in checks.items()))
    print(f"wall time {result['wall_seconds']:.0f} s")
    if args.out:
        write_json(args.out, result, default=str)
    return 0


register("optimizers", main)
