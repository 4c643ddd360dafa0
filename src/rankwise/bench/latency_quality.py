"""`rankwise bench latency --quality`: held-out loss of LoRA, DoRA and FFBA trained at the same
trainable-parameter budget with the recipe (latency.py holds the command and the timing).

Every setting trains at each lr of a sweep (the same sweep for all); its lr is chosen on the validation split
and its test loss reported at that lr; with several seeds each sweep point is the mean over them. Besides
all-linear LoRA, LoRA can train on a subset of the projections at the same budget (the placement
diagnostic of issue 22: q+k+v+gate+up, before the residual junction, vs o+down, after it).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from rankwise.bench._harness import builtin_jsonl, lowest


LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}  # --lora-targets spelling -> the Llama module name PEFT matches


def lora_modules(targets: str) -> list[str] | str:
    """'all-linear' as it is, else a '+'-joined subset of LORA_MODULES' keys as module names."""
    return targets if targets == "all-linear" else [LORA_MODULES[t] for t in targets.split("+")]


def lora_params_per_rank(model, targets: str = "all-linear") -> int:
    """r·(d_in + d_out) summed over the decoder's linears that `targets` adapts, per unit of rank."""
    names = None if targets == "all-linear" else set(lora_modules(targets))
    return sum(m.in_features + m.out_features for n, m in model.get_decoder().layers.named_modules()
               if isinstance(m, torch.nn.Linear) and (names is None or n.rsplit(".", 1)[-1] in names))


def quality_arms(base, lora_rank: int, methods: list[str], lora_targets: list[str], lora_scales, placements: list[str],
                 activations: list[str], ffba_scales, ffba_adapters: list[str], ffba_splits,
                 lora_inits: tuple[str, ...] = ("default",), ffba_reads: tuple[str, ...] = ("hidden",)) -> dict[str, dict]:
    """{label: the run's overrides} for every setting --quality trains, each at the trainable budget of
    all-linear LoRA at `lora_rank`: LoRA and DoRA once per target set (its own rank), PEFT initialisation
    (`lora_inits`: "default" or an init_lora_weights name) and scale s = alpha/rank; FFBA once per placement,
    activation, scale and adapter kind (forward, backward, both at each split; backward and both once per
    `ffba_reads`: what the backward down-projection reads, hidden or normed)."""
    from rankwise.ffba.inject import rank_for_budget

    budget = lora_rank * lora_params_per_rank(base)
    arms = {}
    for method in (m for m in ("lora", "dora") if m in methods):
        for targets in lora_targets:
            rank = max(1, round(budget / lora_params_per_rank(base, targets)))
            for init in lora_inits:
                for scale in lora_scales:
                    label = (method + ("" if targets == "all-linear" else f" {targets}")
                             + ("" if init == "default" else f" {init}") + _scale_tag(scale))
                    arms[label] = {"method": method, "rank": rank, "alpha": scale * rank, "targets": targets}
                    if targets != "all-linear":  # (the default)
                        arms[label]["target_modules"] = lora_modules(targets)
                    if init != "default":
                        arms[label]["method_args.init_lora_weights"] = init
    if "ffba" not in methods:
        return arms
    for adapters, reads in ((a, r) for a in ffba_adapters for r in (["hidden"] if a == "forward" else ffba_reads)):
        for split in (ffba_splits if adapters == "both" else [None]):
            for placement in placements:
                blocks = placement.split("+")
                kind = ({"adapters": adapters} | ({"split": split} if split is not None else {})
                        | ({"reads": reads} if reads != "hidden" else {}))
                rank = (ffba_rank_for(base, lora_rank, len(blocks)) if adapters == "forward"
                        else rank_for_budget(base, budget, blocks=tuple(blocks), **kind))
                for activation in activations:
                    for scale in ffba_scales:
                        extra = {"method_args.activation": activation, "method_args.blocks": blocks, "scale": scale,
                                 **{f"method_args.{k}": v for k, v in kind.items()}}
                        arms[ffba_label(extra)] = {"method": "ffba", "rank": rank, "alpha": scale * rank,
                                                   **{k: v for k, v in extra.items() if k != "scale"}}
    return arms


def ffba_rank_for(model, lora_rank: int, blocks: int = 2) -> int:
    """The forward-FFBA rank whose budget (2·d·r per adapted sub-block) is closest to all-linear LoRA's at
    `lora_rank`, with adapters on `blocks` sub-blocks per layer (2: attention and MLP; 1: twice the rank)."""
    per_rank = 2 * model.config.hidden_size * blocks * len(model.get_decoder().layers)
    return max(1, round(lora_rank * lora_params_per_rank(model) / per_rank))


def quality(model_name: str, arms: dict[str, dict], steps: int, lrs: list[float], workdir: Path, tiny: bool,
            batch_size: int, eval_examples: int, precision: str, seeds: tuple[int, ...] = (0,),
            task_examples: int = 0, device: str = "auto", validation_examples: int = 0, progress=None) -> dict:
    """Test loss after `steps` steps of the recipe for every arm of `quality_arms`, each at every lr of `lrs`
    and every seed of `seeds` (adapter initialisation and data order; the evaluation sets stay the same); a
    sweep point's losses are means over the seeds. Each arm's lr is chosen on the validation split
    (`validation_examples` of it; on the test set itself, the same favour for all, when 0) and its test loss
    at that lr is reported. With `task_examples`, each run also answers that many test prompts greedily
    and reports their mean ROUGE-L F1 against the references (the task metric). Runs train on `device`.
    A run whose loss diverges counts as infinitely bad (it can never be chosen) and the sweep goes on;
    `progress(results so far)` is called after each setting (e.g. to save them)."""
    from rankwise.config import load_config
    from rankwise.recipes import train as recipe

    common = {"model": model_name, "steps": steps, "sample": False, "precision": precision,
              "eval_every": 0, "count_flops": False, "batch_size": batch_size,
              "eval_examples": eval_examples, "eval_generate": task_examples, "device": device,
              "validation_examples": validation_examples}
    if tiny:  # a 500-example slice of the built-in data keeps each run's data preparation to a second
        common.update({"data": builtin_jsonl(workdir / "stdlib-500.jsonl", 500), "max_length": 128,
                       "warmup_steps": 2})
    chosen_by = "validation_loss" if validation_examples else "eval_loss"  # (harness.selection_loss's rule)
    results = {}
    for label, arm in arms.items():
        overrides = {k: v for k, v in arm.items() if k != "targets"}
        sweep = {}
        for lr in lrs:
            per_seed = {}
            for seed in seeds:
                run = {**common, **overrides, "lr": lr, "seed": seed,
                       "out": str(workdir / f"{_slug(label)}-lr{lr:g}-seed{seed}")}
                try:
                    summary = recipe.train(load_config(None, run), say=lambda *a: None)
                except recipe.TrainingDiverged as e:
                    summary = {"eval_loss_start": float("nan"), "eval_loss": float("inf"), "cum_seconds": 0.0,
                               "validation_loss": float("inf") if validation_examples else None,
                               "rouge_l": None, "diverged": str(e).split(";")[0]}
                    print(f"  {label:<26} rank {arm['rank']:>3} lr {lr:<7g}: {summary['diverged']}", flush=True)
                    per_seed[seed] = summary
                    continue
                per_seed[seed] = summary
                print(f"  {label:<26} rank {arm['rank']:>3} lr {lr:<7g}" + (f" seed {seed}" if len(seeds) > 1 else "")
                      + f": test loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss']:.4f}"
                      + (f", validation {summary['validation_loss']:.4f}" if validation_examples else "")
                      + (f", ROUGE-L {summary['rouge_l']:.4f}" if summary["rouge_l"] is not None else "")
                      + f" ({summary['cum_seconds']:.0f} s)", flush=True)
            sweep[f"{lr:g}"] = _over_seeds(per_seed)
        best = lowest(sweep, lambda lr: sweep[lr][chosen_by])
        results[label] = {"method": arm["method"], "rank": arm["rank"], "alpha": arm["alpha"],
                          "targets": arm.get("targets"), "sweep": sweep, "best_lr": float(best),
                          "chosen_by": chosen_by, **sweep[best]}
        if progress is not None:
            progress(results)
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
    if any("diverged" in r for r in runs):
        point["diverged"] = {str(seed): r["diverged"] for seed, r in per_seed.items() if "diverged" in r}
    if all(r.get("validation_loss") is not None for r in runs):
        point["validation_loss"] = statistics.fmean(r["validation_loss"] for r in runs)
        point["validation_seeds"] = {str(seed): r["validation_loss"] for seed, r in per_seed.items()}
    if all(r.get("rouge_l") is not None for r in runs):
        point["rouge_l"] = statistics.fmean(r["rouge_l"] for r in runs)
        point["rouge_l_seeds"] = {str(seed): r["rouge_l"] for seed, r in per_seed.items()}
    return point


def ffba_label(extra: dict) -> str:
    """'ffba (identity)' for forward adapters at the default placement (attention and MLP) and scale
    s = alpha / rank = 2, else e.g. 'ffba mlp (silu)', 'ffba s=8 (identity)', 'ffba backward (identity)',
    'ffba both 0.25 (identity)' (the split: the backward adapters' share of the rank; 0.5 unwritten),
    'ffba backward normed (identity)' (backward adapters that read the normed input)."""
    placement = "+".join(extra["method_args.blocks"])
    where = "" if placement == "attn+mlp" else f" {placement}"
    kind = extra.get("method_args.adapters", "forward")
    split = extra.get("method_args.split")
    kind = "" if kind == "forward" else f" {kind}" + ("" if split in (None, 0.5) else f" {split:g}")
    kind += " normed" if extra.get("method_args.reads", "hidden") == "normed" else ""
    return f"ffba{kind}{where}{_scale_tag(extra['scale'])} ({extra['method_args.activation']})"


def _scale_tag(scale: float) -> str:
    return "" if scale == 2 else f" s={scale:g}"


def quality_table(results: dict) -> str:
    """Each setting's chosen lr, its validation loss (where measured), test loss and ROUGE-L (where
    measured), and FFBA against all-linear LoRA's best test loss over its scales."""
    rouge = all("rouge_l" in r for r in results.values())  # the task metric, at each method's best lr
    val = all("validation_loss" in r for r in results.values())
    width = max([18] + [len(label) + 1 for label in results])
    lines = [f"{'method':<{width}}{'rank':>5}{'best lr':>9}" + (f"{'valid.':>9}" if val else "") + f"{'test':>9}"
             + (f"{'ROUGE-L':>9}" if rouge else "") + "  (test loss at every lr)"]
    for label, r in results.items():
        every = ", ".join(f"{lr}: {v['eval_loss']:.4f}" for lr, v in r["sweep"].items())
        lines.append(f"{label:<{width}}{r['rank']:>5}{r['best_lr']:>9g}" + (f"{r['validation_loss']:>9.4f}" if val else "")
                     + f"{r['eval_loss']:>9.4f}" + (f"{r['rouge_l']:>9.4f}" if rouge else "") + f"  ({every})")
    lora = min((r["eval_loss"] for label, r in results.items()
                if label.split(" ")[0] == "lora" and r.get("targets", "all-linear") == "all-linear"), default=None)
    for label, r in results.items():
        if label.startswith("ffba") and lora is not None:
            verdict = "no worse than LoRA: met" if r["eval_loss"] <= lora else "worse than LoRA: MISSED"
            lines.append(f"{label}: {r['eval_loss'] - lora:+.4f} vs LoRA's best, every scale ({verdict})")
    return "\n".join(lines)
