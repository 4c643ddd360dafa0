"""`rankwise bench latency`: what an adapter costs at inference, at equal trainable-parameter budget.

One run, the same prompts for every configuration, batch 1 and batch 8:
    base | LoRA merged | LoRA unmerged | DoRA unmerged | FFBA unfused | FFBA fused
prefill time (one forward over the prompt, filling the KV cache) and per-token decode time (greedy
steps with the cache), each the median of --repeats timed runs after one warm-up; configurations are
timed round-robin so that drift on a shared machine hits them all alike.

`--quality` instead trains LoRA, DoRA and FFBA at the same budget with the recipe and reports
held-out loss after --steps steps (rankwise.bench.latency_quality).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rankwise.bench import positive_numbers, register, write_json
from rankwise.bench._harness import device_or_exit
from rankwise.bench.latency_quality import (LORA_MODULES, ffba_rank_for, lora_params_per_rank, quality,  # noqa: F401
                                            quality_arms,
                                            quality_table as _quality_table)  # (the names tests use)
from rankwise.ffba.settings import BLOCKS, READS, VARIANTS as ADAPTER_KINDS

SCALES = {  # prompt tokens, new tokens, LoRA rank (FFBA's rank is derived); quality: steps, batch, eval examples,
    # held-out prompts answered by generation for the task metric
    "tiny": {"prompt_tokens": 32, "new_tokens": 8, "lora_rank": 4, "steps": 30, "batch_size": 4, "eval_examples": 16,
             "task_examples": 2, "validation_examples": 8},
    "default": {"prompt_tokens": 64, "new_tokens": 32, "lora_rank": 12, "steps": 40, "batch_size": 8,
                "eval_examples": 64, "task_examples": 32, "validation_examples": 64},
}
VARIANTS = ("base", "lora merged", "lora unmerged", "dora unmerged", "ffba unfused", "ffba fused")


# ---- equal budgets ----------------------------------------------------------------------------------
def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- the six configurations ---------------------------------------------------------------------------
def _nonzero_(params, seed: int, std: float = 0.02) -> None:
    """Give zero-initialised up-projections values, as training would (timing is value-blind, merging is not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def ffba_up_projections(model) -> list:
    """An unfused FFBA model's zero-initialised up-projections: every forward adapter's B and every backward
    adapter's receiving B."""
    from rankwise.ffba import adapters, junctions

    return [a.B for a in adapters(model).values()] + [r.B for j in junctions(model).values() for r in j.receivers]


def plus_joined(option: str, text: str, allowed, also=()) -> list[str]:
    """A comma-separated option whose items are '+'-joined subsets of `allowed` (no repeats) or one of `also`;
    ValueError naming the option otherwise."""
    items = [x for x in text.split(",") if x]
    if not items or any(x not in also and (not set(x.split("+")) <= set(allowed)
                                           or len(set(x.split("+"))) != len(x.split("+"))) for x in items):
        raise ValueError(f"{option}: each is {' or '.join([*also, ''])}a '+'-joined subset of "
                         f"{', '.join(allowed)}, got {text!r}")
    return items


def build_variants(base, lora_rank: int, ffba_rank: int, activation: str,
                   kind: str = "forward", reads: str = "hidden") -> tuple[dict, dict]:
    """{name: model in eval mode} and {name: trainable parameters before merging/fusing}; FFBA's adapters of
    `kind` (forward, backward or both at the default split; backward ones reading `reads`)."""
    from rankwise.config import Config
    from rankwise.ffba import Settings, fuse, inject
    from rankwise.methods import get_method

    models, budgets = {"base": copy.deepcopy(base)}, {"base": 0}
    for method in ("lora", "dora"):
        cfg = Config(method=method, rank=lora_rank, alpha=2 * lora_rank)
        peft_model = get_method(method).apply(copy.deepcopy(base), cfg)
        budgets[f"{method} unmerged"] = n_trainable(peft_model)
        _nonzero_([p for n, p in peft_model.named_parameters() if "lora_B" in n], seed=1)
        models[f"{method} unmerged"] = peft_model
        if method == "lora":
            budgets["lora merged"] = budgets["lora unmerged"]
            models["lora merged"] = copy.deepcopy(peft_model).merge_and_unload()
    unfused = inject(copy.deepcopy(base), Settings(rank=ffba_rank, alpha=2 * ffba_rank, activation=activation,
                                                   adapters=kind, reads=reads).check())
    budgets["ffba unfused"] = budgets["ffba fused"] = n_trainable(unfused)
    _nonzero_(ffba_up_projections(unfused), seed=1)
    models["ffba unfused"] = unfused
    models["ffba fused"] = fuse(copy.deepcopy(unfused))
    return {name: models[name].eval() for name in VARIANTS}, {name: budgets[name] for name in VARIANTS}


# ---- timing -----------------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model) -> str:
    """The KV cache's keyword: transformers renamed `past_key_values` to `cache` (5.2x)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@torch.inference_mode()
def time_generation(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, list]:
    """(prefill seconds, decode seconds per token, generated ids) for one greedy run with a KV cache."""
    from transformers import DynamicCache

    device = ids.device
    cache = {_cache_argument(model): DynamicCache(config=model.config)}
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **cache)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    generated = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, use_cache=True, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    _sync(device)
    decode = (time.perf_counter() - start) / max(1, new_tokens - 1)
    return prefill, decode, torch.cat(generated, dim=1).tolist()


def prompts(tok, n: int, length: int) -> torch.Tensor:
    """`n` held-out prompts cut to exactly `length` tokens (no padding, so every variant sees the same work)."""
    from rankwise.data import load_splits, prompt_ids

    rows = []
    for example in load_splits("stdlib-docstrings").test:
        ids = prompt_ids(tok, example["messages"][:-1])
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            return torch.tensor(rows)
    raise ValueError(f"fewer than {n} held-out prompts have {length} tokens")


def measure(models: dict, batches: dict[int, torch.Tensor], new_tokens: int, repeats: int) -> dict:
    """{variant: {batch: {prefill_s, decode_s_per_token, ...}}}, medians over `repeats` round-robin runs."""
    samples = {v: {b: {"prefill": [], "decode": []} for b in batches} for v in models}
    tokens = {}
    for run in range(repeats + 1):  # run 0 warms up caches and allocators and is discarded
        for b, ids in batches.items():
            for name, model in models.items():
                prefill, decode, generated = time_generation(model, ids, new_tokens)
                tokens[name, b] = generated
                if run > 0:
                    samples[name][b]["prefill"].append(prefill)
                    samples[name][b]["decode"].append(decode)
    results = {}
    for name in models:
        results[name] = {}
        for b in batches:
            s = samples[name][b]
            results[name][b] = {"prefill_s": statistics.median(s["prefill"]),
                                "decode_s_per_token": statistics.median(s["decode"]),
                                "prefill_all": s["prefill"], "decode_all": s["decode"]}
    same = all(tokens["ffba fused", b] == tokens["ffba unfused", b] for b in batches)
    return {"timings": results, "ffba_fused_tokens_equal_unfused": same}


# ---- the command --------------------------------------------------------------------------------------
def _load(scale: str, workdir: Path):
    from rankwise.models import load_model, load_tokenizer

    if scale == "tiny":
        from rankwise.tiny import make_tiny_model_dir

        name = str(make_tiny_model_dir(workdir / "tiny-model"))
    else:
        name = "default"
    return name, load_tokenizer(name), load_model(name)


def _table(result: dict, batches: list[int]) -> str:
    rows = [f"{'configuration':<15} {'budget':>10} " + " ".join(
        f"{'prefill b' + str(b) + ' ms':>15} {'decode b' + str(b) + ' ms/tok':>19}" for b in batches)]
    base = result["timings"]["base"]
    for name, per_batch in result["timings"].items():
        cells = []
        for b in batches:
            t = per_batch[b]
            cells.append(f"{1e3 * t['prefill_s']:>9.2f} ({t['prefill_s'] / base[b]['prefill_s']:.2f}x) "
                         f"{1e3 * t['decode_s_per_token']:>11.2f} ({t['decode_s_per_token'] / base[b]['decode_s_per_token']:.2f}x)")
        rows.append(f"{name:<15} {result['budgets'][name]:>10,} " + " ".join(cells))
    return "\n".join(rows)


def targets(result: dict, batches: list[int]) -> dict:
    """The issue's targets: fused FFBA decode ≤ 1.05× base and ≤ 0.85× unmerged LoRA, per batch size."""
    t = result["timings"]
    out = {}
    for b in batches:
        fused = t["ffba fused"][b]["decode_s_per_token"]
        vs_base = fused / t["base"][b]["decode_s_per_token"]
        vs_lora = fused / t["lora unmerged"][b]["decode_s_per_token"]
        out[b] = {"fused_vs_base": vs_base, "fused_vs_lora_unmerged": vs_lora,
                  "met_base": vs_base <= 1.05, "met_lora": vs_lora <= 0.85}
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rankwise bench latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="default",
                   help="tiny: a tiny random Llama (< 2 min); default: the embedded SmolLM2-135M")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma separated")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default by scale)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens decoded per run (default by scale)")
    p.add_argument("--lora-rank", type=int, help="LoRA/DoRA rank; FFBA's rank is chosen for the same budget")
    p.add_argument("--activation", default="identity", help="FFBA φ: identity | relu | silu")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when present) | cpu | cuda[:N]; --quality trains there too")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="weights dtype; auto = fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: 1 at tiny scale, where threads only add overhead; else torch's default)")
    p.add_argument("--quality", action="store_true", help="compare held-out loss at equal budget instead")
    p.add_argument("--steps", type=int, help="training steps per method for --quality (default by scale)")
    p.add_argument("--batch-size", type=int, help="sequences per step for --quality (default by scale)")
    p.add_argument("--eval-examples", type=int, help="held-out examples for --quality (default by scale)")
    p.add_argument("--lr", default="2e-3", help="learning rate(s) for --quality, comma separated: every method "
                   "runs at each, and its best is reported")
    p.add_argument("--methods", default="lora,dora,ffba", help="which of lora, dora, ffba --quality trains")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="training precision for --quality")
    p.add_argument("--activations", default="identity,silu", help="FFBA φ values trained by --quality")
    p.add_argument("--ffba-scales", default="2", help="FFBA scales s = alpha / rank trained by --quality, comma "
                   "separated")
    p.add_argument("--lora-scales", default="2", help="LoRA and DoRA scales s = alpha / rank trained by --quality, "
                   "comma separated (sweep them whenever FFBA's are swept: the same favour for both)")
    p.add_argument("--ffba-blocks", default="attn+mlp", help="FFBA placements trained by --quality, comma "
                   "separated, each attn+mlp | attn | mlp (each at its own equal-budget rank)")
    p.add_argument("--lora-targets", default="all-linear",
                   help="LoRA/DoRA target sets trained by --quality, comma separated: all-linear or a '+'-joined subset "
                        "of q, k, v, o, gate, up, down (each at the rank of all-linear's budget)")
    p.add_argument("--lora-inits", default="default",
                   help="LoRA/DoRA initialisations trained by --quality, comma separated: default or a PEFT "
                        "init_lora_weights name (pissa, olora, gaussian, ...)")
    p.add_argument("--ffba-adapters", default="forward",
                   help="FFBA adapter kinds: forward | backward | both; --quality trains each (comma separated), "
                        "the latency run times one")
    p.add_argument("--ffba-reads", default="hidden",
                   help="what backward adapters read: hidden (the output projection's input) | normed (the "
                        "sub-block's normed input); --quality trains each (comma separated), the latency run times one")
    p.add_argument("--ffba-splits", default="0.5", help="for adapters=both: the backward adapters' share of the "
                                                        "rank, comma separated, each in (0, 1)")
    p.add_argument("--validation-examples", type=int,
                   help="validation examples each --quality run is scored on to choose its lr (default by scale; "
                        "0: choose on the test set)")
    p.add_argument("--seeds", default="0", help="seeds for --quality, comma separated: every setting trains once "
                   "per seed (adapter initialisation and data order) and reports the mean held-out loss")
    p.add_argument("--task-examples", type=int, help="held-out prompts each --quality run answers greedily, scored "
                   "by ROUGE-L F1 against the reference (the task metric; 0 = off; default by scale)")
    p.add_argument("--out", help="write the results as JSON here")
    ns = p.parse_args(argv)
    if ns.repeats < 5 and not ns.quality:
        p.error("--repeats must be at least 5 (medians of fewer runs are too noisy to report)")
    try:
        lrs = positive_numbers("--lr", ns.lr)
        ffba_scales = positive_numbers("--ffba-scales", ns.ffba_scales)
        lora_scales = positive_numbers("--lora-scales", ns.lora_scales)
        splits = positive_numbers("--ffba-splits", ns.ffba_splits)
        lora_targets = plus_joined("--lora-targets", ns.lora_targets, LORA_MODULES, also=("all-linear",))
        placements = plus_joined("--ffba-blocks", ns.ffba_blocks, BLOCKS)
    except ValueError as e:
        p.error(str(e))
    if not all(x < 1 for x in splits):
        p.error(f"--ffba-splits: each split must be in (0, 1), got {ns.ffba_splits!r}")
    kinds = [k for k in ns.ffba_adapters.split(",") if k]
    if not kinds or set(kinds) - set(ADAPTER_KINDS) or len(set(kinds)) != len(kinds) or (not ns.quality and len(kinds) > 1):
        p.error(f"--ffba-adapters: {'distinct values' if ns.quality else 'one'} of {', '.join(ADAPTER_KINDS)}, "
                f"got {ns.ffba_adapters!r}")
    reads = [r for r in ns.ffba_reads.split(",") if r]
    if (not reads or set(reads) - set(READS) or len(set(reads)) != len(reads) or (not ns.quality and len(reads) > 1)
            or (reads != ["hidden"] and kinds == ["forward"])):
        p.error(f"--ffba-reads: {'distinct values' if ns.quality else 'one'} of {', '.join(READS)}, for "
                f"--ffba-adapters backward or both, got {ns.ffba_reads!r}")
    inits = [i for i in ns.lora_inits.split(",") if i]
    try:
        from rankwise.methods.peft_lora import check_init_name

        for init in inits:
            if init != "default":
                check_init_name(init)
    except ValueError as e:
        p.error(f"--lora-inits: {e}")
    if not inits or len(set(inits)) != len(inits):
        p.error(f"--lora-inits: distinct names, comma separated, got {ns.lora_inits!r}")
    if ns.validation_examples is not None and ns.validation_examples < 0:
        p.error(f"--validation-examples: a whole number >= 0, got {ns.validation_examples}")
    seeds = [x.strip() for x in ns.seeds.split(",") if x.strip()]
    if not seeds or not all(x.isdigit() for x in seeds) or len(set(map(int, seeds))) != len(seeds):
        p.error(f"--seeds: distinct non-negative whole numbers, comma separated, got {ns.seeds!r}")
    seeds = [int(x) for x in seeds]
    if ns.task_examples is not None and ns.task_examples < 0:
        p.error(f"--task-examples: a whole number >= 0, got {ns.task_examples}")
    if not all(lr < 1 for lr in lrs):
        p.error(f"--lr: every learning rate must be in (0, 1), got {ns.lr!r}")
    methods = [m for m in ns.methods.split(",") if m]
    if not methods or set(methods) - {"lora", "dora", "ffba"}:
        p.error(f"--methods: choose from lora, dora, ffba, got {ns.methods!r}")
    if ns.threads or ns.scale == "tiny":
        torch.set_num_threads(ns.threads or 1)
    scale = SCALES[ns.scale]
    batches = [int(b) for b in ns.batches.split(",")]
    lora_rank = ns.lora_rank or scale["lora_rank"]
    device = device_or_exit(p, ns.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rankwise-latency-") as tmp:
        name, tok, base = _load(ns.scale, Path(tmp))
        print(f"loaded in {time.perf_counter() - started:.0f} s")
        ffba_rank = ffba_rank_for(base, lora_rank)
        if not ns.quality and kinds[0] != "forward":  # the same budget for the other adapter kinds
            from rankwise.ffba.inject import rank_for_budget

            ffba_rank = rank_for_budget(base, lora_rank * lora_params_per_rank(base), adapters=kinds[0],
                                        reads=reads[0])
        record = {"bench": "latency", "scale": ns.scale, "model": name if ns.scale != "tiny" else "tiny random Llama",
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": str(device),
                  "threads": torch.get_num_threads(), "lora_rank": lora_rank, "ffba_rank": ffba_rank,
                  "activation": ns.activation}
        print(f"model {record['model']} on {device} ({torch.get_num_threads()} threads) | LoRA/DoRA rank "
              f"{lora_rank}, FFBA rank {ffba_rank}")
        if ns.quality:
            steps = ns.steps or scale["steps"]
            acts = [a for a in ns.activations.split(",") if a]
            print(f"quality: {steps} steps, lr {', '.join(f'{lr:g}' for lr in lrs)}, {ns.precision}, "
                  f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (mean held-out loss), "
                  f"alpha = {', '.join(f'{x:g}' for x in lora_scales)}·rank for LoRA and DoRA, "
                  f"{', '.join(f'{x:g}' for x in ffba_scales)}·rank for FFBA")
            ffba_ranks = {b: ffba_rank_for(base, lora_rank, len(b.split("+"))) for b in placements}
            task_examples = scale["task_examples"] if ns.task_examples is None else ns.task_examples
            validation = scale["validation_examples"] if ns.validation_examples is None else ns.validation_examples
            arms = quality_arms(base, lora_rank, methods, lora_targets, lora_scales, placements, acts, ffba_scales,
                                kinds, splits, tuple(inits), tuple(reads))
            record.update({"mode": "quality", "seeds": seeds, "task_examples": task_examples,
                           "validation_examples": validation, "ffba_ranks": ffba_ranks, "ffba_scales": ffba_scales,
                           "lora_scales": lora_scales, "lora_targets": lora_targets, "lora_inits": inits, "ffba_adapters": kinds,
                           "ffba_reads": reads, "ffba_splits": splits, "steps": steps, "lrs": lrs, "precision": ns.precision,
                           "batch_size": ns.batch_size or scale["batch_size"]})

            def save_so_far(rows: dict) -> None:  # a stopped sweep keeps the settings it finished
                if ns.out:
                    write_json(ns.out, {**record, "partial": True, "quality": rows}, default=str)

            quality_rows = quality(name, arms, steps, lrs, Path(tmp), ns.scale == "tiny",
                                   ns.batch_size or scale["batch_size"], ns.eval_examples or scale["eval_examples"],
                                   ns.precision, tuple(seeds), task_examples, str(device), validation, save_so_far)
            record["quality"] = quality_rows
            print(_quality_table(quality_rows))
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
                ns.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
            models, budgets = build_variants(base, lora_rank, ffba_rank, ns.activation, kinds[0], reads[0])
            record["ffba_adapters"], record["ffba_reads"] = kinds[0], reads[0]
            models = {k: m.to(device=device, dtype=dtype) for k, m in models.items()}
            length = ns.prompt_tokens or scale["prompt_tokens"]
            new_tokens = ns.new_tokens or scale["new_tokens"]
            rows = prompts(tok, max(batches), length).to(device)
            measured = measure(models, {b: rows[:b] for b in batches}, new_tokens, ns.repeats)
            record.update({"mode": "latency", "dtype": str(dtype).replace("torch.", ""), "prompt_tokens": length,
                           "new_tokens": new_tokens, "repeats": ns.repeats, "budgets": budgets, **measured})
            print("trainable-parameter budgets: " + ", ".join(f"{k} {v:,}" for k, v in budgets.items() if v))
            print(f"prompts: {length} tokens, {new_tokens} new tokens, median of {ns.repeats} runs, {record['dtype']}")
            print(_table(record, batches))
            record["targets"] = targets(record, batches)
            for b, t in record["targets"].items():
                print(f"batch {b}: FFBA fused decode = {t['fused_vs_base']:.3f}x base (target <= 1.05: "
                      f"{'met' if t['met_base'] else 'MISSED'}), {t['fused_vs_lora_unmerged']:.3f}x LoRA unmerged "
                      f"(target <= 0.85: {'met' if t['met_lora'] else 'MISSED'})")
            print(f"FFBA fused generates the same tokens as unfused: {record['ffba_fused_tokens_equal_unfused']}")
    record["wall_seconds"] = time.perf_counter() - started
    print(f"done in {record['wall_seconds']:.0f} s")
    if ns.out:
        write_json(ns.out, record, default=str)
        print(f"wrote {ns.out}")
    return 0


register("latency", main)
