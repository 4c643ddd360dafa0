"""`rankwise bench latency --quality`: held-out loss of LoRA, DoRA and FFBA trained at the same
trainable-parameter budget with the recipe (latency.py holds the command and the timing).

Every method trains at each lr of a sweep; its best is chosen on the same held-out set (the same favour
for all), and with several seeds each sweep point is the mean over them.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from rankwise.bench._harness import builtin_jsonl, lowest


def quality(model_name: str, lora_rank: int, ffba_ranks: dict[str, int], steps: int, lrs: list[float],
            methods: list[str], activations: list[str], workdir: Path, tiny: bool, batch_size: int,
            eval_examples: int, precision: str, ffba_scales: tuple[float, ...] = (2.0,),
            lora_scales: tuple[float, ...] = (2.0,), seeds: tuple[int, ...] = (0,), task_examples: int = 0,
            device: str = "auto") -> dict:
    """Held-out loss after `steps` steps of the recipe for LoRA, DoRA and FFBA at the same budget, each at
    every lr of `lrs`; "best" per method is chosen on the same held-out set (the same favour for all).
    FFBA trains once per placement of `ffba_ranks` ("attn+mlp", "mlp", ...: its equal-budget rank),
    activation and scale s = alpha / rank of `ffba_scales`; LoRA and DoRA once per scale of `lora_scales`.
    Every setting trains once per seed of `seeds` (adapter initialisation and data order; the held-out set
    stays the same), and its loss is the mean over them. With `task_examples`, each run also answers that
    many held-out prompts greedily and reports their mean ROUGE-L F1 against the references (the task metric).
    Every run trains on `device` (the recipe's device setting)."""
    from rankwise.config import load_config
    from rankwise.recipes.train import train

    runs = [(m, lora_rank, {"scale": scale}) for m in ("lora", "dora") if m in methods for scale in lora_scales]
    if "ffba" in methods:
        runs += [("ffba", rank, {"method_args.activation": a, "method_args.blocks": placement.split("+"),
                                 "scale": scale})
                 for placement, rank in ffba_ranks.items() for a in activations for scale in ffba_scales]
    common = {"model": model_name, "steps": steps, "sample": False, "precision": precision,
              "eval_every": 0, "count_flops": False, "batch_size": batch_size,
              "eval_examples": eval_examples, "eval_generate": task_examples, "device": device}
    if tiny:  # a 500-example slice of the built-in data keeps each run's data preparation to a second
        common.update({"data": builtin_jsonl(workdir / "stdlib-500.jsonl", 500), "max_length": 128,
                       "warmup_steps": 2})
    results = {}
    for method, rank, extra in runs:
        label = ffba_label(extra) if method == "ffba" else method + _scale_tag(extra["scale"])
        sweep = {}
        for lr in lrs:
            knobs = {k: v for k, v in extra.items() if k != "scale"}
            per_seed = {}
            for seed in seeds:
                overrides = {**common, "method": method, "rank": rank, "alpha": extra.get("scale", 2) * rank, "lr": lr,
                             "seed": seed, **knobs, "out": str(workdir / f"{_slug(label)}-lr{lr:g}-seed{seed}")}
                summary = train(load_config(None, overrides), say=lambda *a: None)
                per_seed[seed] = summary
                print(f"  {label:<18} rank {rank:>3} lr {lr:<7g}" + (f" seed {seed}" if len(seeds) > 1 else "")
                      + f": held-out loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss']:.4f}"
                      + (f", ROUGE-L {summary['rouge_l']:.4f}" if summary["rouge_l"] is not None else "")
                      + f" ({summary['cum_seconds']:.0f} s)", flush=True)
            sweep[f"{lr:g}"] = _over_seeds(per_seed)
        best = lowest(sweep, lambda lr: sweep[lr]["eval_loss"])
        results[label] = {"rank": rank, "alpha": overrides["alpha"], "sweep": sweep, "best_lr": float(best),
                          **sweep[best]}
    return results


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace("(", "").replace(")", "")


def _over_seeds(per_seed: dict[int, dict]) -> dict:
    """One sweep point: the held-out losses' mean over seeds, and each seed's final loss."""
    runs = list(per_seed.values())
    point = {"eval_loss_start": statistics.fmean(r["eval_loss_start"] for r in runs),
             "eval_loss": statistics.fmean(r["eval_loss"] for r in runs),
             "train_seconds": sum(r["cum_seconds"] for r in runs),
             "seeds": {str(seed): r["eval_loss"] for seed, r in per_seed.items()}}
    if all(r.get("rouge_l") is not None for r in runs):
        point["rouge_l"] = statistics.fmean(r["rouge_l"] for r in runs)
        point["rouge_l_seeds"] = {str(seed): r["rouge_l"] for seed, r in per_seed.items()}
    return point


def ffba_label(extra: dict) -> str:
    """'ffba (identity)' at the default placement (attention and MLP) and scale s = alpha / rank = 2,
    else e.g. 'ffba mlp (silu)', 'ffba s=8 (identity)'."""
    placement = "+".join(extra["method_args.blocks"])
    where = "" if placement == "attn+mlp" else f" {placement}"
    return f"ffba{where}{_scale_tag(extra['scale'])} ({extra['method_args.activation']})"


def _scale_tag(scale: float) -> str:
    return "" if scale == 2 else f" s={scale:g}"


def quality_table(results: dict) -> str:
    """Each method's best lr and held-out loss (and ROUGE-L where measured), and FFBA against LoRA's best."""
    rouge = all("rouge_l" in r for r in results.values())  # the task metric, at each method's best lr
    lines = [f"{'method':<18}{'rank':>5}{'best lr':>9}{'held-out':>10}" + (f"{'ROUGE-L':>9}" if rouge else "")
             + "  (every lr)"]
    for label, r in results.items():
        every = ", ".join(f"{lr}: {v['eval_loss']:.4f}" for lr, v in r["sweep"].items())
        lines.append(f"{label:<18}{r['rank']:>5}{r['best_lr']:>9g}{r['eval_loss']:>10.4f}"
                     + (f"{r['rouge_l']:>9.4f}" if rouge else "") + f"  ({every})")
    lora = min((r["eval_loss"] for label, r in results.items() if label.split(" ")[0] == "lora"), default=None)
    for label, r in results.items():
        if label.startswith("ffba") and lora is not None:
            verdict = "no worse than LoRA: met" if r["eval_loss"] <= lora else "worse than LoRA: MISSED"
            lines.append(f"{label}: {r['eval_loss'] - lora:+.4f} vs LoRA's best, every scale ({verdict})")
    return "\n".join(lines)
