"""Pre-train a small Llama from scratch on the Python standard library's own source code.

    rankwise pretrain optimizer=lorapre rank=8 steps=400 out=runs/pretrain-lorapre

Data: every .py file of the running interpreter's standard library (test suites left out), split by
file into train / validation (a hash of the path, 1 file in 20 held out), tokenized with a byte-level
BPE trained here on the train files, and packed into one token stream per split; a batch is random
windows of seq_len tokens. Tokenizer and token streams are cached, so a sweep prepares them once.
Optimizers come from the registry (adamw, galore, lorapre, lorapre-muon): they train every weight.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from rankwise import runtime
from rankwise.config import ConfigError, coerce, parse_value
from rankwise.optim import OptimizerSpec, get_optimizer, low_rank_groups, optimizer_state_bytes
from rankwise.train.checkpoint import atomic_dir, atomic_write_text
from rankwise.train.metrics import MetricsLog
from rankwise.train.schedule import build_scheduler

EOS = "<|endoftext|>"


@dataclass
class PretrainConfig:
    # the model: a Llama, sized by these keys (defaults: about 4.5M parameters with vocab 4096)
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 688
    vocab: int = 4096  # BPE vocabulary trained on the train split
    seq_len: int = 256
    corpus_mb: float = 12.0  # at most this much source text for training (validation: a twentieth)
    # the optimizer, from rankwise.optim's registry
    optimizer: str = "adamw"  # adamw | galore | lorapre | lorapre-muon
    rank: int = 16  # low-rank state rank (galore, lorapre, lorapre-muon)
    optimizer_args: dict = field(default_factory=dict)  # e.g. optimizer_args.update_proj_gap=50
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"
    clip: float = 1.0
    # the loop
    steps: int = 300
    batch_size: int = 16
    eval_every: int = 50  # steps between validation losses; 0 = only at the end
    eval_batches: int = 8  # validation windows = eval_batches * batch_size, fixed positions
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 weights)
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    cache: str = "~/.cache/rankwise/pretrain"
    out: str = "runs/pretrain"
    overwrite: bool = False
    progress: bool = True
    save: bool = True  # write the final model (safetensors) and tokenizer to out/model


def parse_overrides(items: list[str], base: PretrainConfig | None = None) -> PretrainConfig:
    """key=value overrides (dotted keys for optimizer_args) on top of `base`; ConfigError if unknown."""
    values = dataclasses.asdict(base or PretrainConfig())
    hints = typing.get_type_hints(PretrainConfig)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        head, _, sub = key.strip().partition(".")
        if head not in hints:
            raise ConfigError(f"unknown pretrain key {head!r}; known: {', '.join(hints)}")
        if sub:
            if head != "optimizer_args":
                raise ConfigError(f"{head!r} has no sub-keys (in {key!r})")
            values[head] = {**values[head], sub: parse_value(text)}
        else:
            values[head] = coerce(head, parse_value(text), hints[head])
    cfg = PretrainConfig(**values)
    check(cfg)
    return cfg


def optimizer_spec(cfg: PretrainConfig) -> OptimizerSpec:
    """The optimizer's spec (ConfigError if it cannot pre-train: every weight trains, as method=full)."""
    entry = get_optimizer(cfg.optimizer)
    entry.check_update("full", "full (pre-training)", ["full"])
    return entry.make_spec(cfg.optimizer_args, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                           clip=cfg.clip, rank=cfg.rank)


def check(cfg: PretrainConfig) -> None:
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq_len", "steps",
                "batch_size", "eval_batches"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads:
        raise ConfigError(f"hidden ({cfg.hidden}) must divide by heads ({cfg.heads}), heads by kv_heads ({cfg.kv_heads})")
    if cfg.vocab < 300:
        raise ConfigError(f"vocab must be at least 300 (256 bytes + merges), got {cfg.vocab}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    optimizer_spec(cfg)


# ---- data ----------------------------------------------------------------------------------------
def stdlib_files() -> tuple[list[Path], list[Path], list[Path]]:
    """The standard library's .py files (no test suites), split by a hash of the path: (train, val, test).
    One file in 20 is held out; half of those are the validation files (what settings are chosen on), the
    other half the test files (what is reported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    order = sorted(files, key=lambda p: zlib.crc32(str(p.relative_to(root)).encode()))
    held = {p: zlib.crc32(str(p.relative_to(root)).encode()) % 40 for p in order}
    val = [p for p in order if held[p] == 0]
    test = [p for p in order if held[p] == 20]
    train = [p for p in order if held[p] % 20]
    return train, val, test


def _read(files: list[Path], budget_bytes: float) -> list[str]:
    texts, total = [], 0
    for path in files:
        if total >= budget_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
    return texts


def prepare_data(cfg: PretrainConfig, say=print):
    """(tokenizer, train, val and test token ids), built once per (python, vocab, corpus_mb) and cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # (-split2: held-out files split into validation and test; before that, all of them were validation)
    key = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v{cfg.vocab}-mb{cfg.corpus_mb:g}-split2"
    cache = Path(cfg.cache).expanduser() / key
    if (cache / "test.pt").is_file():
        tok = Tokenizer.from_file(str(cache / "tokenizer.json"))
        return tok, *(torch.load(cache / f"{name}.pt") for name in ("train", "val", "test"))
    start = time.perf_counter()
    train_files, val_files, test_files = stdlib_files()
    train_texts = _read(train_files, cfg.corpus_mb * 1e6)
    val_texts, test_texts = _read(val_files, cfg.corpus_mb * 1e6 / 40), _read(test_files, cfg.corpus_mb * 1e6 / 40)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_texts, trainer)
    eos = tok.token_to_id(EOS)

    def stream(texts):  # files joined by an end-of-text token; int16 holds any vocab below 32768
        ids = [i for enc in tok.encode_batch(texts) for i in (*enc.ids, eos)]
        return torch.tensor(ids, dtype=torch.int16 if cfg.vocab < 2 ** 15 else torch.int32)

    train_ids, val_ids, test_ids = stream(train_texts), stream(val_texts), stream(test_texts)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{key}."))
    tok.save(str(tmp / "tokenizer.json"))
    for name, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids)):
        torch.save(ids, tmp / f"{name}.pt")
    for name in ("tokenizer.json", "train.pt", "val.pt", "test.pt"):  # test.pt last: it marks a complete cache
        os.replace(tmp / name, cache / name)
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"data: {len(train_texts)} train / {len(val_texts)} val / {len(test_texts)} test files, {len(train_ids):,} / "
        f"{len(val_ids):,} / {len(test_ids):,} tokens, BPE vocab {tok.get_vocab_size()} "
        f"({time.perf_counter() - start:.0f} s, cached in {cache})")
    return tok, train_ids, val_ids, test_ids


def windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A (len(starts), seq_len) batch of token windows."""
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()]).long()


# ---- model and loop ------------------------------------------------------------------------------
def build_model(cfg: PretrainConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq_len,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


@torch.no_grad()
def validation_loss(model, val_ids: torch.Tensor, cfg: PretrainConfig, device, autocast) -> float:
    """Mean next-token loss (nats) over fixed, evenly spaced windows of a held-out stream (validation or test)."""
    n = cfg.eval_batches * cfg.batch_size
    starts = torch.linspace(0, len(val_ids) - cfg.seq_len - 1, n).long()
    was = model.training
    model.eval()
    total = 0.0
    for chunk in starts.split(cfg.batch_size):
        x = windows(val_ids, chunk, cfg.seq_len).to(device)
        with autocast():
            total += float(model(input_ids=x, labels=x).loss) * len(chunk)
    model.train(was)
    return total / n


def run(cfg: PretrainConfig, say=print) -> dict:
    """Train from scratch; returns a summary: val_loss, val_ppl, parameter and optimizer-state counts, costs."""
    check(cfg)
    out = Path(cfg.out)
    if (out / "metrics.jsonl").exists() and not cfg.overwrite:
        raise ConfigError(f"out={out} already holds a run; pass overwrite=true or choose another out=")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok, train_ids, val_ids, test_ids = prepare_data(cfg, say)
    runtime.seed_everything(cfg.seed)
    device = runtime.pick_device(cfg.device)
    autocast = runtime.autocast_for(cfg.precision, device)
    model = build_model(cfg, tok.get_vocab_size()).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = get_optimizer(cfg.optimizer).build(model, optimizer_spec(cfg))
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.schedule)
    (out / "config.yaml").write_text(yaml.safe_dump({**dataclasses.asdict(cfg), "betas": list(cfg.betas)}))
    (out / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(out / "metrics.jsonl")
    say(f"model: Llama {n_params / 1e6:.2f}M parameters | optimizer {cfg.optimizer} (rank {cfg.rank}) lr {cfg.lr:g}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    val_start = validation_loss(model, val_ids, cfg, device, autocast)
    log.write({"kind": "eval", "step": 0, "val_loss": val_start})
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens, seconds, loss = 0, 0.0, float("nan")
    bar = tqdm(total=cfg.steps, desc=f"pretrain {cfg.optimizer}", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    diverged = False
    try:
        for step in range(1, cfg.steps + 1):
            start = time.perf_counter()
            x = windows(train_ids, torch.randint(0, len(train_ids) - cfg.seq_len, (cfg.batch_size,), generator=gen),
                        cfg.seq_len).to(device)
            with autocast():
                loss_t = model(input_ids=x, labels=x).loss
            loss_t.backward()
            loss = loss_t.item()
            if not math.isfinite(loss):
                diverged = True
                say(f"loss became {loss} at step {step}; stopping (try a lower lr)")
                break
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            seconds += time.perf_counter() - start
            tokens += x.numel()
            log.write({"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": tokens, "seconds": seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                val = validation_loss(model, val_ids, cfg, device, autocast)
                log.write({"kind": "eval", "step": step, "val_loss": val})
                bar.write(f"step {step}: val loss {val:.4f}")
        bar.close()
        val = float("inf") if diverged else validation_loss(model, val_ids, cfg, device, autocast)
        test = float("inf") if diverged else validation_loss(model, test_ids, cfg, device, autocast)
        log.write({"kind": "eval", "step": step, "val_loss": val, "test_loss": test})
    finally:
        log.close()
    summary = {"optimizer": cfg.optimizer, "rank": cfg.rank, "lr": cfg.lr,
               "update_scale": cfg.optimizer_args.get("scale"), "steps": step, "diverged": diverged,
               "val_loss_start": val_start, "val_loss": val, "test_loss": test,
               "val_ppl": math.exp(val) if math.isfinite(val) and val < 50 else float("inf"),
               "train_loss": loss, "params": n_params, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
               # the attention / MLP matrices only: where low-rank state differs from Adam's
               "matrix_state_bytes": optimizer_state_bytes(optimizer, low_rank_groups(model, 1)[0]["params"]),
               "tokens": tokens, "train_seconds": seconds,
               "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}
    if cfg.save and not diverged:
        _save_model(model, tok, out / "model")
        summary["model_dir"] = str(out / "model")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    say(f"val loss {val:.4f} (ppl {summary['val_ppl']:.2f}) after {step} steps, {tokens:,} tokens, "
        f"{seconds:.0f} s | optimizer state {summary['optimizer_state_bytes'] / 2 ** 20:.2f} MiB")
    return summary


def _save_model(model, tok, final: Path) -> None:
    """Write the model and tokenizer to a temporary sibling, then rename: `final` is complete or absent."""
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save(str(tmp / "tokenizer.json"))


USAGE = """usage: rankwise pretrain [key=value ...]

Pre-train a small Llama from scratch on the Python standard library's source.
Keys (default):
""" + "\n".join(f"  {f.name} ({f.default if f.default is not dataclasses.MISSING else '{}'})"
                for f in dataclasses.fields(PretrainConfig))


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    summary = run(parse_overrides(list(argv)))
    return 1 if summary["diverged"] else 0
