"""`rankwise bench ffba-agreement`: how far FFBA's fused form drifts from its unfused form in bf16, with LoRA
merged vs unmerged (the same operation for LoRA: fold the adapter into the weights) as the yardstick.

Each adapter gets random non-zero up-projections (as the latency bench does), rescaled until the adapter
moves the fp32 model's logits as far from the base model's as LoRA's does (mean |Δ logit| over the prompts:
the same std would move the backward adapters' model ~25× further, into noise). The model is cast to bf16,
and the inference form is built from the bf16 model (`--build bf16`, what `Method.load` does on a bf16 base)
or built in fp32 and then cast (`--build fp32`). For each pair (reference: unfused / unmerged; candidate:
fused / merged), over N held-out prompts:
  greedy   both generate T tokens with a KV cache; tokens equal position by position, sequences equal;
  forced   both score the reference's prompt + T tokens: max and mean |Δ logit| at the T positions that
           chose those tokens, and how often their argmax agrees;
  truth    the same max |Δ logit| of each bf16 model against the fp32 unfused / unmerged model.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from rankwise.bench import register, write_json
from rankwise.bench.latency import _nonzero_, ffba_up_projections

SCALES = {"tiny": {"prompts": 4, "prompt_tokens": 16, "new_tokens": 8, "lora_rank": 4},
          "default": {"prompts": 32, "prompt_tokens": 48, "new_tokens": 32, "lora_rank": 12}}


@torch.inference_mode()
def effect(model, base_logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean |logit - base logit| over every position of the prompts (fp32)."""
    return float((scored_logits(model, ids, 1) - base_logits).abs().mean())


@torch.inference_mode()
def match_effect_(model, ups: list, target: float, base_logits, ids, steps: int = 24) -> float:
    """Rescale the up-projections `ups` by one factor until `effect` is `target` (within 2%; bisection on the
    log of the factor, since the effect need not be linear in it); returns the effect reached."""
    start = [p.detach().clone() for p in ups]

    def at(factor: float) -> float:
        for p, p0 in zip(ups, start):
            p.copy_(p0 * factor)
        return effect(model, base_logits, ids)

    low, high = 1.0, 1.0
    while at(low) > target and low > 1e-6:
        low /= 4
    while at(high) < target and high < 1e6:
        high *= 4
    reached = at(high)
    for _ in range(steps):
        if abs(reached / target - 1) < 0.02:
            break
        middle = (low * high) ** 0.5
        reached = at(middle)
        low, high = (middle, high) if reached < target else (low, middle)
    return reached


def build_pairs(base, lora_rank: int, variants: list[str], std: float, build: str, ids: torch.Tensor) -> dict:
    """{pair name: (fp32 reference, bf16 reference, bf16 candidate, trainable parameters, effect)}; `ids`: the
    prompts the effects are measured on."""
    from rankwise.config import Config
    from rankwise.ffba import Settings, fuse, inject
    from rankwise.ffba.inject import rank_for_budget
    from rankwise.methods import get_method

    bf16 = torch.bfloat16
    pairs = {}
    lora = get_method("lora").apply(copy.deepcopy(base), Config(method="lora", rank=lora_rank, alpha=2 * lora_rank))
    _nonzero_([p for n, p in lora.named_parameters() if "lora_B" in n], seed=1, std=std)
    budget = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    base_logits = scored_logits(base, ids, 1)
    target = effect(lora.eval(), base_logits, ids)
    merged = (copy.deepcopy(lora).merge_and_unload().to(bf16) if build == "fp32"
              else copy.deepcopy(lora).to(bf16).merge_and_unload())
    pairs["lora merged vs unmerged"] = (lora, copy.deepcopy(lora).to(bf16), merged, budget, target)
    for variant in variants:
        rank = rank_for_budget(base, budget, adapters=variant)
        unfused = inject(copy.deepcopy(base), Settings(rank=rank, alpha=2 * rank, adapters=variant).check())
        ups = ffba_up_projections(unfused)
        _nonzero_(ups, seed=1, std=std)
        reached = match_effect_(unfused.eval(), ups, target, base_logits, ids)
        n = sum(p.numel() for p in unfused.parameters() if p.requires_grad)
        fused = fuse(copy.deepcopy(unfused)).to(bf16) if build == "fp32" else fuse(copy.deepcopy(unfused).to(bf16))
        pairs[f"ffba {variant} r={rank} fused vs unfused"] = (unfused, copy.deepcopy(unfused).to(bf16), fused, n,
                                                              reached)
    return {name: tuple(m.eval() if isinstance(m, torch.nn.Module) else m for m in pair) for name, pair in pairs.items()}


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from rankwise.bench.latency import time_generation

    return torch.tensor(time_generation(model, ids, new_tokens)[2])


@torch.inference_mode()
def scored_logits(model, seqs: torch.Tensor, first: int, chunk: int = 8) -> torch.Tensor:
    """fp32 logits at positions first-1 … end-2 (those that chose tokens first … end-1), `chunk` rows at a time."""
    return torch.cat([model(input_ids=seqs[i:i + chunk]).logits[:, first - 1:-1].float()
                      for i in range(0, len(seqs), chunk)])


def compare(truth, reference, candidate, ids: torch.Tensor, new_tokens: int) -> dict:
    ref_tokens, cand_tokens = greedy(reference, ids, new_tokens), greedy(candidate, ids, new_tokens)
    seqs = torch.cat([ids, ref_tokens], dim=1)
    first = ids.shape[1]
    exact, ref, cand = (scored_logits(m, seqs, first) for m in (truth, reference, candidate))
    gap = (cand - ref).abs()
    return {"greedy_token_agreement": float((ref_tokens == cand_tokens).float().mean()),
            "greedy_sequences_equal": int((ref_tokens == cand_tokens).all(dim=1).sum()),
            "forced_argmax_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float(gap.max()), "mean_abs_logit_diff": float(gap.mean()),
            "logit_scale": float(ref.abs().max()),
            "reference_vs_fp32_max": float((ref - exact).abs().max()),
            "candidate_vs_fp32_max": float((cand - exact).abs().max()),
            "reference_vs_fp32_mean": float((ref - exact).abs().mean()),
            "candidate_vs_fp32_mean": float((cand - exact).abs().mean())}


def table(results: dict, n_prompts: int) -> str:
    lines = [f"{'pair (bf16)':<38}{'budget':>11}{'effect':>8}{'max|Δ|':>9}{'mean|Δ|':>9}{'argmax':>8}{'tokens':>8}{'seqs':>7}"
             f"{'ref-fp32':>10}{'cand-fp32':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<38}{r['budget']:>11,}{r['effect_vs_base']:>8.3f}{r['max_abs_logit_diff']:>9.4f}{r['mean_abs_logit_diff']:>9.4f}"
                     f"{r['forced_argmax_agreement']:>8.4f}{r['greedy_token_agreement']:>8.4f}"
                     f"{r['greedy_sequences_equal']:>4}/{n_prompts:<2}{r['reference_vs_fp32_max']:>10.4f}"
                     f"{r['candidate_vs_fp32_max']:>10.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from rankwise.ffba.settings import VARIANTS

    p = argparse.ArgumentParser(prog="rankwise bench ffba-agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="default",
                   help="tiny: a tiny random Llama (seconds); default: the embedded SmolLM2-135M")
    p.add_argument("--prompts", type=int, help="held-out prompts (default by scale)")
    p.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default by scale)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per prompt (default by scale)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank; each FFBA variant gets the rank of the same budget")
    p.add_argument("--variants", default=",".join(VARIANTS), help="FFBA adapters compared, comma separated")
    p.add_argument("--std", type=float, default=0.02, help="std of the random up-projections (B)")
    p.add_argument("--build", choices=("bf16", "fp32"), default="bf16",
                   help="fuse / merge the bf16 model (bf16), or fuse / merge in fp32 and then cast (fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", help="write the results as JSON here")
    ns = p.parse_args(argv)
    variants = [v for v in ns.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}, got {ns.variants!r}")
    if ns.std <= 0:
        p.error(f"--std: a number > 0, got {ns.std}")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    scale = SCALES[ns.scale]
    n, length = ns.prompts or scale["prompts"], ns.prompt_tokens or scale["prompt_tokens"]
    new_tokens, lora_rank = ns.new_tokens or scale["new_tokens"], ns.lora_rank or scale["lora_rank"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rankwise-agreement-") as tmp:
        from rankwise.bench.latency import _load, prompts

        name, tok, base = _load(ns.scale, Path(tmp))
        ids = prompts(tok, n, length)
        pairs = build_pairs(base.float().eval(), lora_rank, variants, ns.std, ns.build, ids)
        results = {}
        for pair, (truth, reference, candidate, budget, moved) in pairs.items():
            results[pair] = {"budget": budget, "effect_vs_base": moved,
                             **compare(truth, reference, candidate, ids, new_tokens)}
            print(f"  {pair}: max |Δ logit| {results[pair]['max_abs_logit_diff']:.4f}, greedy tokens equal "
                  f"{results[pair]['greedy_token_agreement']:.4f}", flush=True)
    record = {"bench": "ffba-agreement", "scale": ns.scale, "model": name if ns.scale != "tiny" else "tiny random Llama",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
              "prompts": n, "prompt_tokens": length, "new_tokens": new_tokens, "lora_rank": lora_rank,
              "std": ns.std, "build": ns.build, "results": results,
              "wall_seconds": time.perf_counter() - started}
    print(f"bf16, {n} prompts x {new_tokens} tokens, B ~ N(0, {ns.std:g}) rescaled to LoRA's effect (mean |Δ logit| "
          f"vs base, fp32), inference form built in {ns.build}")
    print(table(results, n))
    print(f"done in {record['wall_seconds']:.0f} s")
    if ns.out:
        write_json(ns.out, record)
        print(f"wrote {ns.out}")
    return 0


register("ffba-agreement", main)
