"""`rankwise bench overhead`: what a rankwise step costs beyond its kernels.

Side by side on the same model, initial weights and pre-collated batches, each step timed from the CPU
batch to the finished update (host-to-device copy included, the device synchronised on CUDA):

- minimal: a hand-written loop — forward, loss on labelled tokens, backward, clip, AdamW (foreach);
- rankwise: the recipe's own `train_step` (count_flops=false), and the other variants asked for:
  flops (count_flops=true), loft, lorapre, lorapre-muon, full (their optimizer or method instead).

Every variant is built first, then they take turns, one step each on the same batch (who goes first
rotates every step), so machine noise hits every variant alike. The report gives each variant's
median step (over repeats of the median after the warm-up steps) and mean step (every step after the
first, so FLOP counting's first steps are charged), and the ratios the targets are stated in (paired
per repeat, then the median):
rankwise / minimal, flops / rankwise, loft / rankwise, lorapre / rankwise.

`--ops` also dispatches one more step of each rankwise variant under a counting mode and reports what a
GPU would feel: operators launched per step (by name), and host reads of tensor values (`.item()`,
`nonzero`, ...) with the line that made each — the syncs, where the tensor lives on the device.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from rankwise import runtime
from rankwise.bench import register, training_batches, write_json
from rankwise.bench._harness import layered, typed
from rankwise.config import load_config

WARMUP_STEPS = 3  # excluded from the medians (allocator, thread pool, FLOP fitting's first counts)
VARIANTS = {  # name -> overrides on top of the bench's config; "minimal" is the hand-written loop
    "minimal": {},
    "rankwise": {"count_flops": False},
    "flops": {"count_flops": True},
    "loft": {"optimizer": "loft", "count_flops": False},
    "lorapre": {"method": "full", "optimizer": "lorapre", "count_flops": False},
    "lorapre-muon": {"method": "full", "optimizer": "lorapre-muon", "count_flops": False},
    "full": {"method": "full", "count_flops": False},
}
RATIOS = {"rankwise/minimal": ("rankwise", "minimal"), "flops/rankwise": ("flops", "rankwise"),
          "loft/rankwise": ("loft", "rankwise"), "lorapre/rankwise": ("lorapre", "rankwise"),
          "lorapre-muon/rankwise": ("lorapre-muon", "rankwise"), "full/rankwise": ("full", "rankwise")}
SCALES = {"tiny": {"batch_size": 8, "precision": "fp32"}, "default": {}}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minimal_stepper(cfg):
    """A step function for the plainest loop that trains the same adapter on a CPU batch."""
    from rankwise.methods import get_method
    from rankwise.models import load_model
    from rankwise.train.loss import to_device

    device = runtime.pick_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    model = get_method(cfg.method).apply(load_model(cfg.model), cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    autocast = runtime.autocast_for(cfg.precision, device)

    def step(cpu_batch):
        b = to_device(cpu_batch, device)
        with autocast():
            hidden = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, b["label_index"]))
        F.cross_entropy(logits.float(), b["targets"]).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, device, lambda: None


HOST_READS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal")  # ops whose result goes to the host


def count_ops(step) -> dict:
    """Operators dispatched by `step()` by name, and host reads with the tensor's device (a read of a CPU
    tensor costs no sync) and the innermost rankwise/transformers/torch.optim/peft frame that asked."""
    import collections
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    ops, reads = collections.Counter(), collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            ops[name] += 1
            if name in HOST_READS:
                frames = [f for f in traceback.extract_stack()[:-1]
                          if any(k in f.filename for k in ("rankwise", "transformers", "torch/optim", "peft"))]
                where = frames[-1] if frames else None
                device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "?")
                place = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
                reads[f"{name} of a {device} tensor{place}"] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return {"ops_per_step": sum(ops.values()), "by_op": dict(ops.most_common(15)), "host_reads": dict(reads)}


def _rankwise_stepper(cfg):
    """A step function running the recipe's train_step on a given CPU batch."""
    from rankwise.train.loss import to_device
    from rankwise.recipes.train import build_run, train_step

    run = build_run(cfg, say=lambda *_: None)
    pending = []
    run.micro_batch = lambda: to_device(pending.pop(), run.device)

    def step(cpu_batch):
        pending.append(cpu_batch)
        train_step(run)

    return step, run.device, run.log_file.close


def summarize(times: dict[str, list[list[float]]]) -> dict:
    """Per variant: median step (median over repeats of each repeat's median after warm-up) and mean step
    (over repeats of each repeat's mean after its first step). Ratios are paired: a ratio per repeat
    between variants that stepped in turn, then the median over repeats."""
    medians = {name: [statistics.median(r[WARMUP_STEPS:]) for r in repeats] for name, repeats in times.items()}
    means = {name: [statistics.fmean(r[1:]) for r in repeats] for name, repeats in times.items()}
    out = {"median_s": {name: statistics.median(v) for name, v in medians.items()},
           "mean_s": {name: statistics.median(v) for name, v in means.items()}, "ratios": {}}
    for label, (a, b) in RATIOS.items():
        if a in times and b in times:
            out["ratios"][label] = {kind: statistics.median(x / y for x, y in zip(per[a], per[b]))
                                    for kind, per in (("median", medians), ("mean", means))}
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rankwise bench overhead", description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                   help="tiny: a random tiny Llama, batch 8, fp32 (fixed costs dominate); default: SmolLM2-135M")
    p.add_argument("--variants", default="minimal,rankwise,flops",
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, help=f"steps per variant and repeat (medians skip the first {WARMUP_STEPS})")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    p.add_argument("--ops", action="store_true", help="count operators and host reads of one step per variant")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="train config overrides, e.g. rank=8 batch_size=4")
    ns = p.parse_args(argv)
    variants = [v for v in ns.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    steps = ns.steps or (30 if ns.scale == "tiny" else 8)
    if steps <= WARMUP_STEPS or ns.repeats < 1:
        p.error(f"--steps must be > {WARMUP_STEPS} and --repeats >= 1")

    user = typed(ns.overrides)
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    ops: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {"sample": False, "eval_every": 0, "device": ns.device, "steps": steps, **SCALES[ns.scale]}
        if ns.scale == "tiny":
            from rankwise.tiny import make_tiny_model_dir

            base["model"] = str(make_tiny_model_dir(tmp / "tiny"))
        cfg = load_config(None, layered(base, user, {"out": str(tmp / "probe")}))
        batches = training_batches(cfg, steps)
        for r in range(ns.repeats):
            steppers = {}
            for name in variants:  # every variant built first, then stepped in turn on the same batch
                run_cfg = load_config(None, layered(base, VARIANTS[name], user, {"out": str(tmp / f"{name}{r}")}))
                steppers[name] = (_minimal_stepper if name == "minimal" else _rankwise_stepper)(run_cfg)
                times[name].append([])
            for i, batch in enumerate(batches):
                for k in range(len(variants)):
                    name = variants[(i + k + r) % len(variants)]  # rotate who goes first, step by step
                    step, device, _ = steppers[name]
                    start = time.perf_counter()
                    step(batch)
                    _synchronize(device)
                    times[name][-1].append(time.perf_counter() - start)
            if ns.ops and r == 0:
                for name in variants:
                    if name != "minimal":
                        ops[name] = count_ops(lambda: steppers[name][0](batches[-1]))
            for name in variants:
                steppers[name][2]()
                print(f"repeat {r + 1}/{ns.repeats} {name:13s} median step "
                      f"{1e3 * statistics.median(times[name][-1][WARMUP_STEPS:]):8.2f} ms", flush=True)
            del steppers
            gc.collect()

    summary = summarize(times)
    device = runtime.pick_device(ns.device)
    report = {"benchmark": "overhead", "date": date.today().isoformat(), "machine": _machine(device),
              "scale": ns.scale, "steps": steps, "warmup_steps": WARMUP_STEPS, "repeats": ns.repeats,
              "overrides": ns.overrides, "step_seconds": times, **summary, **({"ops": ops} if ops else {})}
    print("\n| variant | median step (ms) | mean step (ms) |\n|---|---|---|")
    for name in variants:
        print(f"| {name} | {1e3 * summary['median_s'][name]:.2f} | {1e3 * summary['mean_s'][name]:.2f} |")
    for label, ratio in summary["ratios"].items():
        print(f"{label} = {ratio['median']:.3f} (median step), {ratio['mean']:.3f} (mean step)")
    for name, counted in ops.items():
        reads = ", ".join(f"{n}x {where}" for where, n in counted["host_reads"].items()) or "none"
        print(f"{name}: {counted['ops_per_step']} operators per step; host reads: {reads}")
    if ns.out:
        write_json(ns.out, report)
    return 0


def _machine(device: torch.device) -> str:
    import platform

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


register("overhead", main)
