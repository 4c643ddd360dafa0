"""Peak training memory of LoRA, PEFT's LoRA-FA and rankwise's LoRA-FA, and their parameter accounting.

    rankwise bench memory [--scale tiny|default] [--ranks 8,32,128] [--device auto|cpu|cuda] [--out results.json]
    rankwise bench memory --params [--model PATH] [--opt-shapes]

Memory mode: every (variant, rank) runs in a fresh subprocess on the same packed batch. After one
warm-up step (so gradients and optimizer state exist, as in steady training) it measures a second
full step (forward, backward, clip, optimizer step) three ways:
  peak      — CPU: the process's peak RSS during the step (VmHWM, reset just before the step via
              /proc/self/clear_refs), allocator made honest with MALLOC_MMAP_THRESHOLD_ so freed
              tensors leave RSS; CUDA: torch.cuda.max_memory_allocated. Includes weights.
  held      — memory held after the forward, before backward, above the pre-step level: the
              activations autograd keeps.
  saved     — bytes of distinct tensors autograd saved for backward during the forward
              (torch.autograd.graph.saved_tensors_hooks), parameters and buffers excluded.
Variants: lora (PEFT LoRA + AdamW), peft-lora-fa (PEFT LoRA with
`peft.optimizers.create_lorafa_optimizer`), lora-fa (rankwise, method=lora-fa + AdamW).

Params mode: trainable parameters, % of the model and adapter file size of LoRA and LoRA-FA at
r=16 on q_proj/v_proj (the seed document's table), for a real model (saved for real) and, with
--opt-shapes, for OPT-125M/350M/1.3B built on the meta device (files written from zero tensors of
the adapter's exact shapes: the size does not depend on the values).
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from rankwise.bench import proc_kib, register, reset_peak_rss, trim_heap, write_json
from rankwise.bench._harness import device_or_exit, in_child

VARIANTS = ("lora", "peft-lora-fa", "lora-fa")
MIB = 2**20


# ---- measuring inside one worker process ----------------------------------------------------------
class SavedBytes:
    """Sum of distinct storages autograd saves for backward while active (parameters excluded)."""

    def __init__(self, model):
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen: dict[int, int] = {}

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.skip:
            self.seen[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _packed_batch(model_name: str, batch: int, seq: int) -> dict:
    """batch × seq tokens of real training examples, packed end to end (labels on responses only)."""
    import torch

    from rankwise.data import encode_all, load_splits
    from rankwise.models import load_tokenizer

    tok = load_tokenizer(model_name)
    ids, labels = [], []
    for item in encode_all(tok, load_splits("stdlib-docstrings").train[: batch * seq // 16 + 8], 4096):
        ids += item["input_ids"]
        labels += item["labels"]
        if len(ids) >= batch * seq:
            break
    n = batch * seq
    if len(ids) < n:
        raise RuntimeError(f"not enough training tokens for a {batch} x {seq} batch")
    shape = (batch, seq)
    return {"input_ids": torch.tensor(ids[:n]).view(shape), "labels": torch.tensor(labels[:n]).view(shape),
            "attention_mask": torch.ones(shape, dtype=torch.long)}


def _build(variant: str, model, cfg):
    from rankwise.methods import get_method
    from rankwise.optim import get_optimizer

    if variant == "lora-fa":
        model = get_method("lora-fa").apply(model, cfg)
        return model, get_optimizer("adamw").build(model, cfg)
    model = get_method("lora").apply(model, cfg)
    if variant == "lora":
        return model, get_optimizer("adamw").build(model, cfg)
    from peft.optimizers import create_lorafa_optimizer

    return model, create_lorafa_optimizer(model, r=cfg.rank, lora_alpha=cfg.alpha, lr=cfg.lr)


def worker(spec: dict) -> dict:
    """Measure one (variant, rank) training step; see the module docstring for the three numbers."""
    import torch

    from rankwise import runtime
    from rankwise.config import Config
    from rankwise.models import load_model
    from rankwise.optim import optimizer_state_bytes
    from rankwise.train.loss import token_loss_sum

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    batch = {k: v.to(device) for k, v in torch.load(spec["batch_file"]).items()}
    cfg = Config(model=spec["model"], method="lora" if spec["variant"] != "lora-fa" else "lora-fa",
                 rank=spec["rank"], alpha=2.0 * spec["rank"], dropout=spec["dropout"],
                 target_modules=spec["targets"], precision=spec["precision"], lr=1e-4)
    import peft.optimizers  # noqa: F401  (import the libraries before the baseline: RSS above it is training's)
    import transformers.models.llama.modeling_llama  # noqa: F401

    trim_heap()
    rss_start = proc_kib("VmRSS")
    model = load_model(spec["model"])
    model, optimizer = _build(spec["variant"], model, cfg)
    model.to(device).train()
    autocast = runtime.autocast_for(spec["precision"], device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(saved=None, held=None):
        with saved or contextlib.nullcontext(), autocast():
            loss_sum, n = token_loss_sum(model, batch)
        if held is not None:
            held.append(proc_kib("VmRSS") if not cuda else torch.cuda.memory_allocated() // 1024)
        (loss_sum / max(n, 1)).backward()  # max: a warm-up row of prompt only has no labelled token
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / max(n, 1)

    full, batch = batch, {k: v[:1] for k, v in batch.items()}
    step()  # warm-up on one sequence: gradients and optimizer state now exist, as in steady training
    batch = full
    trim_heap()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() // 1024
    else:
        before = proc_kib("VmRSS")
        reset_peak_rss()  # VmHWM := VmRSS, so the peak is this step's
    saved, held = SavedBytes(model), []
    start = time.perf_counter()
    loss = step(saved, held)
    if cuda:  # the loss read syncs before backward: wait for the rest of the step's kernels too
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() // 1024 if cuda else proc_kib("VmHWM")
    return {**spec, "loss": loss, "seconds": seconds,
            "trainable": sum(p.numel() for p in params),
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB,
            "peak_mib": peak / 1024, "before_mib": before / 1024,
            "process_start_mib": rss_start / 1024 if not cuda else 0.0,
            "held_mib": (held[0] - before) / 1024, "saved_mib": saved.total / MIB,
            "optimizer_state_mib": optimizer_state_bytes(optimizer) / MIB}


def _run_worker(spec: dict) -> dict:
    """One worker in a fresh interpreter: glibc reads MALLOC_MMAP_THRESHOLD_ only when a process starts."""
    row = in_child(worker, spec, fresh=True,
                   env={"MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false"})
    if "error" in row:
        raise RuntimeError(f"worker {spec['variant']} r={spec['rank']} failed:\n{row['error']}")
    return row


def _memory_table(rows: list[dict]) -> str:
    lines = ["| variant | rank | trainable | peak MiB (process) | peak MiB (above runtime) | / LoRA "
             "| held after fwd MiB | saved-for-bwd MiB | optimizer state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lora = {r["rank"]: r["peak_mib"] - r["process_start_mib"] for r in rows if r["variant"] == "lora"}
    for r in sorted(rows, key=lambda r: (r["rank"], VARIANTS.index(r["variant"]))):
        above = r["peak_mib"] - r["process_start_mib"]
        ratio = above / lora[r["rank"]] if r["rank"] in lora else float("nan")
        lines.append(f"| {r['variant']} | {r['rank']} | {r['trainable']:,} | {r['peak_mib']:.0f} | {above:.0f} "
                     f"| {ratio:.2f} | {r['held_mib']:.0f} | {r['saved_mib']:.0f} | {r['optimizer_state_mib']:.1f} |")
    return "\n".join(lines)


def _memory_main(ns, tmp: Path) -> int:
    if ns.scale == "tiny" and ns.model is None:
        from rankwise.tiny import make_tiny_model_dir

        ns.model = str(make_tiny_model_dir(tmp / "tiny-model", hidden=256, layers=4, intermediate=704, heads=4,
                                           kv_heads=2))
    model = ns.model or "default"
    batch, seq = (ns.batch or (8 if ns.scale == "default" else 4)), (ns.seq or (256 if ns.scale == "default" else 64))
    import torch

    batch_file = tmp / "batch.pt"
    torch.save(_packed_batch(model, batch, seq), batch_file)  # one batch, read by every worker
    rows = []
    for rank in ns.ranks:
        for variant in ns.variants:
            spec = {"variant": variant, "rank": rank, "model": model, "batch": batch, "seq": seq,
                    "batch_file": str(batch_file),
                    "dropout": ns.dropout, "targets": ns.targets, "precision": ns.precision,
                    "device": ns.device, "threads": ns.threads}
            row = _run_worker(spec)
            print(f"  {variant:13s} r={rank:<4d} peak {row['peak_mib']:8.0f} MiB  held {row['held_mib']:7.0f} MiB  "
                  f"saved {row['saved_mib']:7.0f} MiB  ({row['seconds']:.1f} s step)", flush=True)
            rows.append(row)
            if ns.out:  # after every row, so a long run that is stopped still leaves its numbers
                write_json(ns.out, {"mode": "memory", "rows": rows}, indent=1)
    print(f"\nmodel={model} batch={batch} seq={seq} precision={ns.precision} targets={ns.targets} "
          f"dropout={ns.dropout} device={ns.device}\n")
    print(_memory_table(rows))
    return 0


# ---- parameter accounting ------------------------------------------------------------------------
OPT_SHAPES = {  # public OPT configs (hidden, ffn, layers, heads, word_embed_proj_dim, layer_norm_before)
    "opt-125m": (768, 3072, 12, 12, 768, True),
    "opt-350m": (1024, 4096, 24, 16, 512, False),
    "opt-1.3b": (2048, 8192, 24, 32, 2048, True),
}


def _opt_on_meta(name: str):
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    hidden, ffn, layers, heads, proj, before = OPT_SHAPES[name]
    cfg = OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                    word_embed_proj_dim=proj, do_layer_norm_before=before, vocab_size=50272,
                    max_position_embeddings=2048)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _adapter_bytes(model, folder: Path) -> int:
    """Size of adapter_model.safetensors; on the meta device, written from zeros of the same shapes."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if any(p.is_meta for p in model.parameters()):
        state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, folder / "adapter_model.safetensors")
    else:
        model.save_pretrained(folder, safe_serialization=True)
    return (folder / "adapter_model.safetensors").stat().st_size


def _param_row(label: str, make_model, rank: int, targets: list[str], tmp: Path) -> dict:
    from rankwise.config import Config
    from rankwise.methods import get_method

    import copy

    row = {"model": label, "rank": rank, "targets": targets}
    base = make_model()
    for method in ("lora", "lora-fa"):
        model = copy.deepcopy(base)
        total_base = sum(p.numel() for p in model.parameters())
        cfg = Config(method=method, rank=rank, alpha=float(rank), target_modules=targets)
        model = get_method(method).apply(model, cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row["base_params"] = total_base
        row[method] = {"trainable": trainable, "percent": 100.0 * trainable / total_base,
                       "adapter_bytes": _adapter_bytes(model, tmp / f"{label}-{method}")}
    return row


def _params_main(ns) -> int:
    from rankwise.models import load_model

    targets = ["q_proj", "v_proj"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [ns.model or "default"]
        for name in models:
            rows.append(_param_row(Path(name).name if name != "default" else "SmolLM2-135M (embedded)",
                                   lambda: load_model(name), ns.param_rank, targets, Path(tmp)))
        if ns.opt_shapes:
            for name in OPT_SHAPES:
                rows.append(_param_row(f"{name} (shapes only)", lambda: _opt_on_meta(name), ns.param_rank,
                                       targets, Path(tmp)))
    print(f"r={ns.param_rank}, alpha=r, target_modules=q_proj,v_proj; % of the base model's parameters\n")
    print("| model | base params | LoRA trainable | LoRA % | LoRA adapter file | LoRA-FA trainable | LoRA-FA % "
          "| LoRA-FA adapter file |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["lora"], r["lora-fa"]
        print(f"| {r['model']} | {r['base_params']:,} | {a['trainable']:,} | {a['percent']:.3f}% | "
              f"{a['adapter_bytes'] / 1e6:.2f} MB | {b['trainable']:,} | {b['percent']:.3f}% | "
              f"{b['adapter_bytes'] / 1e6:.2f} MB |")
    if ns.out:
        write_json(ns.out, {"mode": "params", "rows": rows}, indent=1)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rankwise bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=("tiny", "default"), default="default",
                   help="tiny: a small random Llama (< 2 min); default: the embedded SmolLM2-135M")
    p.add_argument("--model", help="a local model directory instead of the scale's model")
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128])
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--batch", type=int, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 256; tiny 128)")
    p.add_argument("--targets", default="all-linear", help="target_modules, e.g. all-linear or q_proj,v_proj")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when present (peak = torch.cuda.max_memory_allocated), else cpu (peak RSS)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--params", action="store_true", help="parameter accounting table instead of memory")
    p.add_argument("--param-rank", type=int, default=16)
    p.add_argument("--opt-shapes", action="store_true", help="with --params: add OPT-125M/350M/1.3B shapes")
    p.add_argument("--out", help="write results as JSON to this path")
    ns = p.parse_args(argv)
    if "," in ns.targets:
        ns.targets = ns.targets.split(",")
    bad = set(ns.variants) - set(VARIANTS)
    if bad:
        p.error(f"unknown variants {sorted(bad)}; choose from {', '.join(VARIANTS)}")
    if not ns.params:  # resolved here (the workers are fresh processes), so a missing GPU is one line, not a trace
        ns.device = str(device_or_exit(p, ns.device))
    if ns.params:
        return _params_main(ns)
    with tempfile.TemporaryDirectory(prefix="rankwise-mem-") as tmp:  # the tiny model and the batch, then gone
        return _memory_main(ns, Path(tmp))


register("memory", main)
