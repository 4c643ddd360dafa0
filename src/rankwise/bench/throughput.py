"""`rankwise bench throughput`: rankwise's loop vs transformers Trainer + PEFT, same LoRA, same batches.

Both sides train the same PEFT LoRA configuration from the same initial weights on the identical
sequence of pre-collated batches (same padding, same order), with the same optimizer, schedule,
clipping and precision. Repeats alternate between the two so machine noise hits both alike; the
reported figure is the median over repeats of tokens/s (non-pad tokens), first steps excluded.

Both run on --device (auto: CUDA when present): rankwise gets each batch through the recipe's own
`to_device`, the Trainer moves it as it always does. On CUDA every timed step ends with the device
drained (torch.cuda.synchronize), so a step's seconds hold all of its kernels on both sides, and the
report adds the device's name and model FLOPs utilisation against its dense bf16 peak, where known.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from rankwise.bench import register, training_batches, write_json
from rankwise.bench._harness import device_or_exit, layered, typed
from rankwise.config import load_config

WARMUP_STEPS = 2  # excluded from timing on both sides (allocator and thread-pool warm-up)


def _rankwise_run(cfg, batches) -> tuple[list[float], list[float]]:
    """Seconds and FLOPs per step for rankwise's own loop on `batches` (uses the recipe's train_step)."""
    from rankwise.train.loss import to_device
    from rankwise.recipes.train import build_run, train_step

    run = build_run(cfg, say=lambda *_: None)
    feed = iter(batches)
    # same tensors as the Trainer side, in the same order, prepared as the recipe's micro_batch does
    run.micro_batch = lambda: to_device(next(feed), run.device)
    cuda = run.device.type == "cuda"
    times, flops = [], []
    for _ in range(len(batches)):
        record = train_step(run)
        seconds = record["seconds"]
        if cuda:  # the step reads its loss before the optimizer step is queued: wait for that too
            start = time.perf_counter()
            torch.cuda.synchronize(run.device)
            seconds += time.perf_counter() - start
        times.append(seconds)
        flops.append(record["flops"])
    run.log_file.close()
    return times, flops


def _trainer_run(cfg, batches, workdir: Path) -> list[float]:
    """Seconds per step for transformers.Trainer on the same PEFT model and batches."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rankwise.methods import get_method
    from rankwise.models import load_model

    torch.manual_seed(cfg.seed)
    model = get_peft_model(load_model(cfg.model), get_method("lora").lora_config(cfg))
    times: list[float] = []
    cuda = cfg.device.startswith("cuda")

    class StepTimer(TrainerCallback):  # on CUDA, kernels still queued would land in another step's time
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    class Presorted(torch.utils.data.Dataset):  # one item = one whole pre-collated batch
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    args = TrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=1, max_steps=len(batches), learning_rate=cfg.lr,
        lr_scheduler_type="cosine" if cfg.schedule == "cosine" else "constant_with_warmup",
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1], max_grad_norm=cfg.clip, bf16=cfg.precision == "bf16", use_cpu=not cuda,
        save_strategy="no", report_to=[], logging_steps=10_000, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, seed=cfg.seed, optim="adamw_torch")
    if args.device.type == "cuda":  # one GPU, as rankwise: with several visible the Trainer would wrap the
        args._n_gpu = 1  # model in DataParallel and batch several items (what it sets itself for model parallel)
    trainer = Trainer(model=model, args=args, train_dataset=Presorted(), data_collator=lambda items: items[0],
                      callbacks=[StepTimer()])
    trainer.train()
    return times


def _tokens_per_second(batches, times) -> float:
    """Non-pad tokens over seconds of the steps after the warm-up ones."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[WARMUP_STEPS:])
    return tokens / sum(times[WARMUP_STEPS:])


def speedup(tokens_per_s: dict[str, list[float]]) -> tuple[dict[str, float], float]:
    """Each side's median tokens/s over the repeats, and rankwise's median over the Trainer's (the ratio)."""
    median = {side: statistics.median(values) for side, values in tokens_per_s.items()}
    return median, median["rankwise"] / median["trainer"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rankwise bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=["tiny", "default"], default="default",
                   help="tiny: a random tiny Llama (seconds); default: the embedded SmolLM2-135M")
    p.add_argument("--steps", type=int, help="optimizer steps per repeat (timed: steps - 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where both sides train (auto: cuda when present, else cpu)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="train config overrides, e.g. batch_size=8 rank=8")
    ns = p.parse_args(argv)
    if any(o.split("=", 1)[0].strip() == "device" for o in ns.overrides):
        p.error("choose the device with --device, not a device= override")
    device = str(device_or_exit(p, ns.device))  # auto resolved here, so that both sides get the same device
    user = typed(ns.overrides)
    timed = {"rankwise": [], "trainer": []}  # seconds of the timed steps, per repeat

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {"sample": False, "eval_every": 0, "device": device}
        if ns.scale == "tiny":
            from rankwise.tiny import make_tiny_model_dir

            base.update(model=str(make_tiny_model_dir(tmp / "tiny")), batch_size=8, precision="fp32")
        steps = ns.steps or (30 if ns.scale == "tiny" else 8)
        results = {"rankwise": [], "trainer": []}
        for r in range(ns.repeats):
            cfg = load_config(None, layered(base, user, {"steps": steps, "out": str(tmp / f"run{r}")}))
            batches = training_batches(cfg, steps)
            order = ("rankwise", "trainer") if r % 2 == 0 else ("trainer", "rankwise")
            for side in order:
                if side == "rankwise":
                    times, step_flops = _rankwise_run(cfg, batches)
                    model_flops = sum(step_flops[WARMUP_STEPS:])
                else:
                    times = _trainer_run(cfg, batches, tmp / f"trainer{r}")
                results[side].append(_tokens_per_second(batches, times))
                timed[side].append(sum(times[WARMUP_STEPS:]))
                print(f"repeat {r + 1}/{ns.repeats} {side:8s}: {results[side][-1]:8.1f} tokens/s", flush=True)

    median, ratio = speedup(results)
    ours, theirs = median["rankwise"], median["trainer"]
    utilisation = _utilisation(device, model_flops, timed)
    report = {"benchmark": "throughput", "date": date.today().isoformat(), "machine": _machine(),
              "device": device, "device_name": _device_name(device), **utilisation,
              "scale": ns.scale, "steps_per_repeat": steps, "timed_steps": steps - WARMUP_STEPS,
              "overrides": ns.overrides, "config": {k: v for k, v in cfg.to_dict().items()
                                                      if k in ("model", "method", "rank", "alpha", "batch_size",
                                                               "precision", "max_length", "target_modules")},
              "tokens_per_s": results, "median": median, "ratio": ratio}
    print(f"\n| runner | median tokens/s | repeats |\n|---|---|---|\n"
          f"| rankwise | {ours:.1f} | {', '.join(f'{x:.0f}' for x in results['rankwise'])} |\n"
          f"| Trainer + PEFT | {theirs:.1f} | {', '.join(f'{x:.0f}' for x in results['trainer'])} |\n"
          f"\nratio rankwise / Trainer = {ratio:.3f} ({_device_name(device)})")
    if utilisation.get("mfu"):
        print(f"model FLOPs utilisation (median): rankwise {utilisation['mfu']['rankwise']:.1%}, Trainer "
              f"{utilisation['mfu']['trainer']:.1%} of the {utilisation['peak']['name']} dense bf16 peak "
              f"({utilisation['peak']['flops_per_s'] / 1e12:.0f} TFLOP/s)")
    if ns.out:
        write_json(ns.out, report)
    return 0


def _machine() -> str:
    cores = torch.get_num_threads()
    return f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, {cores} threads".strip()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def _utilisation(device: str, model_flops: float, seconds: dict[str, list[float]]) -> dict:
    """On a CUDA device of known peak: model FLOPs utilisation per side (median over repeats), from the
    FLOPs rankwise measured for the timed steps (the same model work for both sides: the Trainer's extra
    logits at prompt positions are not model FLOPs here) over each side's timed seconds."""
    from rankwise.runtime import mfu, peak_flops

    peak = peak_flops(device)
    if peak is None or not model_flops:
        return {}
    return {"peak": {"name": peak[1], "flops_per_s": peak[0], "kind": "dense bf16 tensor core, no sparsity"},
            "model_flops_per_repeat": model_flops,
            "mfu": {side: statistics.median(mfu(model_flops, s, device) for s in times)
                    for side, times in seconds.items()}}


register("throughput", main)
