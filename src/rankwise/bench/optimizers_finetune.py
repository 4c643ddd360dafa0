"""`rankwise bench optimizers --finetune`: fine-tuning at equal optimizer-state memory.

LoRA at rank R keeps AdamW's two moments for A (R x q) and B (p x R): 2 R (p + q) floats per adapted
matrix. LoRA-Pre Adam at the same rank R trains the full p x q matrix with its two moments held in rank-R
factors: the same 2 R (p + q) floats. LoRA-Pre Muon keeps one momentum, R' (p + q) floats, so it gets
rank 2 R. LoRA-Pre freezes everything else (optimizer_args.rest=frozen) so no method keeps full-size
state. Two baselines beside them: LoRA at rank R stepped by Muon (lora-muon: one momentum, so half
LoRA-AdamW's state) and APOLLO at rank R on the full weights (rest frozen too; per p x q matrix, p >= q,
2 R p floats of projected moments plus the R x q projector). And LoRA-FA at rank R (lora-fa: A frozen, so
AdamW's moments of B alone, half LoRA's state). Every method gets its own lr sweep; the best of each
(chosen on the validation split) is compared on the same held-out test set.

--betas sets the same AdamW betas for every method (LoRA-Pre's own default is (0.9, 0.95), the recipe's
(0.9, 0.999)): a like-for-like comparison. --curve-every K scores the test set every K steps, and each
method's best run reports the first scored step at which it reached LoRA's final test loss
(steps_to_lora: LoRA-FA's "steps to target").
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

from rankwise.bench import write_json
from rankwise.bench._harness import best_per, layered, selection_loss, typed
from rankwise.config import ConfigError, load_config
from rankwise.validate import validate
from rankwise.optim import optimizer_state_bytes

METHODS = ("lora", "lorapre", "lorapre-muon", "lora-muon", "apollo", "lora-fa")
DEFAULT = METHODS[:3]  # the equal-state comparison; the two baselines run when named (--optimizers)
SCALES = {
    "tiny": dict(rank=4, steps=12, batch_size=4, max_length=128, eval_examples=16, validation_examples=8,
                 precision="fp32",
                 lrs={"lora": [1e-3, 3e-3], "lorapre": [3e-4, 1e-3], "lorapre-muon": [3e-4, 1e-3],
                      "lora-muon": [1e-3, 3e-3], "apollo": [3e-4, 1e-3], "lora-fa": [1e-3, 3e-3]}),
    # LoRA's grid brackets the best lrs of the LoFT bench at r = 4 and 16 (4e-3, 2e-3); LoRA-Pre's
    # brackets full fine-tuning's best AdamW lr there (1e-4): LoRA-Pre steps the full weights. The Muon
    # variant's step is RMS-matched (0.2) where Adam's first steps are sign-like (RMS ~1), so it wants
    # ~10x the lr: its grid brackets the best measured there (1e-3; 3e-5 and 1e-4 were far behind).
    # lora-muon's step is RMS-matched to AdamW's, so it takes LoRA's grid; APOLLO (Adam-sized steps on
    # the full weights) takes LoRA-Pre Adam's; LoRA-FA (AdamW on B, its gradient corrected to the full
    # step's projection) takes LoRA's
    "default": dict(rank=8, steps=30, batch_size=8, max_length=256, eval_examples=64, validation_examples=64,
                    precision="bf16",
                    lrs={"lora": [2e-3, 4e-3, 8e-3], "lorapre": [3e-5, 1e-4, 3e-4],
                         "lorapre-muon": [3e-4, 1e-3, 3e-3], "lora-muon": [2e-3, 4e-3, 8e-3],
                         "apollo": [3e-5, 1e-4, 3e-4], "lora-fa": [2e-3, 4e-3, 8e-3]}),
}


def method_overrides(method: str, rank: int) -> list[str]:
    """The recipe overrides of one method at the shared state budget of rank-`rank` LoRA."""
    if method in ("lora", "lora-muon", "lora-fa"):
        return [f"method={'lora-fa' if method == 'lora-fa' else 'lora'}",
                f"optimizer={'muon' if method == 'lora-muon' else 'adamw'}", f"rank={rank}", f"alpha={2 * rank}"]
    if method == "apollo":
        return ["method=full", "optimizer=apollo", f"rank={rank}", "optimizer_args.rest=frozen"]
    low_rank = rank if method == "lorapre" else 2 * rank  # Muon keeps one moment: twice the rank, same floats
    return ["method=full", f"optimizer={method}", f"rank={low_rank}", "optimizer_args.rest=frozen",
            "betas=[0.9,0.95]"]


def _finetune(overrides: dict, curve_every: int = 0) -> dict:
    import torch

    from rankwise.config import load_config
    from rankwise.recipes.train import build_run, train_step

    cfg = load_config(None, overrides)
    run_ = build_run(cfg, say=lambda *_: None)
    cuda = run_.device.type == "cuda"
    if cuda:  # runs go in-process on CUDA (no forked child's peak RSS): the allocator's peak instead
        torch.cuda.reset_peak_memory_stats(run_.device)
    start = run_.test_loss()
    curve = [[0, start]]
    for step in range(1, cfg.steps + 1):
        record = train_step(run_)
        if curve_every and step % curve_every == 0 and step < cfg.steps:
            curve.append([step, run_.test_loss()])
    end, validation = run_.test_loss(), run_.validation_loss()
    curve.append([cfg.steps, end])
    run_.log_file.close()
    return {"method": cfg.method, "optimizer": cfg.optimizer, "rank": cfg.rank, "lr": cfg.lr,
            "betas": list(cfg.betas), "eval_loss_start": start, "curve": curve, "eval_loss": end,
            "validation_loss": validation, "train_loss_last": record["loss"],
            "optimizer_state_bytes": optimizer_state_bytes(run_.optimizer),
            "trainable_params": sum(p.numel() for p in run_.trainable()), "train_seconds": run_.cum_seconds,
            "steps": cfg.steps, "device": str(run_.device),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(run_.device) if cuda else None}


def best_per_method(rows: list[dict]) -> dict[str, dict]:
    """{method: its run with the lowest validation loss (harness.selection_loss; its test loss is reported)}."""
    return best_per(rows, "label", selection_loss)


def steps_to_reach(curve: list[list], target: float) -> int | None:
    """The first scored step whose test loss is at or below `target` (None: never, within the run)."""
    return next((step for step, loss in curve if loss <= target), None)


def run_all(scale: dict, workdir: Path, threads: int, model: str, out: str | None, isolated,
            device: str = "auto", betas: list[float] | None = None, curve_every: int = 0) -> list[dict]:
    common = {"device": device, "model": model, "steps": scale["steps"], "batch_size": scale["batch_size"],
              "max_length": scale["max_length"], "eval_examples": scale["eval_examples"],
              "validation_examples": scale["validation_examples"], "eval_every": 0,
              "sample": False, "count_flops": False, "precision": scale["precision"], "threads": threads,
              "overwrite": True, "warmup_steps": 2, "seed": 0}
    settings = [(method, layered(common, typed(method_overrides(method, scale["rank"])),
                                 {"lr": lr, "out": str(workdir / f"{method}-lr{lr:g}")}, {"betas": betas} if betas else {}))
                for method, lrs in scale["lrs"].items() for lr in lrs]
    for method, over in settings:  # every setting checked before the first trains (a bad --betas, say)
        try:
            validate(load_config(None, over))
        except ConfigError as e:
            raise SystemExit(f"{method}: {e}") from None
    rows = []
    for method, over in settings:
        row = {"label": method, **isolated(_finetune, over, curve_every)}
        rows.append(row)
        print(f"finetune {method:<12} rank {row['rank']:>3} lr {row['lr']:<7g} eval loss {row['eval_loss_start']:.4f} -> "
              f"{row['eval_loss']:.4f}, optimizer state {row['optimizer_state_bytes'] / 2**20:.2f} MiB", flush=True)
        if out:  # a stopped sweep keeps its finished runs
            write_json(out, {"bench": "optimizers --finetune", "partial": True, "settings": scale, "runs": rows})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<13} {'optimizer':<13} {'rank':>4} {'lr':>7} {'eval start':>10} {'eval end':>9} "
             f"{'state MiB':>9} {'trainable':>11} {'peak MiB':>9} {'s/step':>7}"]
    for r in rows:
        lines.append(f"{r['method']:<13} {r['optimizer']:<13} {r['rank']:>4} {r['lr']:>7.0e} {r['eval_loss_start']:>10.4f} "
                     f"{r['eval_loss']:>9.4f} {r['optimizer_state_bytes'] / 2**20:>9.2f} {r['trainable_params']:>11,} "
                     f"{(r.get('peak_cuda_bytes') or r.get('peak_rss_growth_bytes', 0)) / 2**20:>9.1f} "
                     f"{r['train_seconds'] / max(1, r['steps']):>7.2f}")
    return "\n".join(lines)


def main(scale_name: str, lrs: dict[str, list[float]], steps: int | None, threads: int, workdir: str,
         out: str | None, isolated, methods=DEFAULT, device: str = "auto", betas: list[float] | None = None,
         curve_every: int = 0) -> int:
    grid = SCALES[scale_name]["lrs"] | lrs
    scale = (SCALES[scale_name] | {"lrs": {m: grid[m] for m in methods}} | ({"steps": steps} if steps else {})
             | {"betas": betas, "curve_every": curve_every})
    started = time.perf_counter()
    work = Path(workdir) / f"finetune-{scale_name}"
    if scale_name == "tiny":
        from rankwise.tiny import make_tiny_model_dir
        model = str(make_tiny_model_dir(work / "tiny-model"))
    else:
        model = "default"
    rows = run_all(scale, work, threads, model, out, isolated, device, betas, curve_every)
    best = best_per_method(rows)
    if curve_every and "lora" in best:
        for row in best.values():
            row["steps_to_lora"] = steps_to_reach(row["curve"], best["lora"]["eval_loss"])
    print("\nall runs:\n" + table(rows) + "\n\nbest lr per method (same held-out set):\n" + table(list(best.values())))
    if "lora" in best:
        for name in METHODS[1:]:
            if name in best:
                reach = (f", reached LoRA's final test loss at step {best[name]['steps_to_lora']}"
                         if "steps_to_lora" in best[name] else "")
                print(f"{name} vs LoRA: eval loss {best[name]['eval_loss'] - best['lora']['eval_loss']:+.4f}, "
                      f"state {best[name]['optimizer_state_bytes'] / best['lora']['optimizer_state_bytes']:.3f}x{reach}")
    if out:
        write_json(out, {"bench": "optimizers --finetune", "scale": scale_name, "settings": scale, "runs": rows,
                         "best": best, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "wall_seconds": time.perf_counter() - started})
    return 0
