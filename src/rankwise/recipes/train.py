"""The training recipe: read top to bottom, it is the whole loop.

    validate -> join the process group -> load data and model -> apply method -> wrap (DDP / FSDP2)
    -> optimizer, schedule, hooks -> (resume)
    -> for each step: micro-batches, backward, clip, step, hooks, eval, checkpoint -> save, plot

Methods, optimizers and hooks come from registries; this file names none of them. Under torchrun every
rank runs this same loop on its slice of each batch (rankwise.train.dist); only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import math
import pickle
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from rankwise import runtime
from rankwise.config import Config, save_config
from rankwise.data import DataError, collate, collate_packed, encode_all, load_splits
from rankwise.models import load_model, load_tokenizer
from rankwise.optim import trainable_parameters
from rankwise.train import checkpoint as ckpt
from rankwise.train import dist
from rankwise.train.flops import FlopMeter, flop_size
from rankwise.hooks import build_hooks
from rankwise.train.loss import mean_loss, to_device, token_loss_sum
from rankwise.train.metrics import MetricsLog, plot_losses, read_metrics
from rankwise.train.schedule import build_scheduler
from rankwise.train.stream import ExampleStream
from rankwise.recipes.task_metric import mean_rouge_l
from rankwise.validate import Plan, validate


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); the previous one is intact."""


@dataclass
class Run:
    """Everything a run holds; hooks see it through rankwise.hooks.RunContext."""

    cfg: Config
    out: Path
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: ExampleStream
    train_items: list[dict]
    tiny_batches: list[dict]
    test_batches: list[dict]
    autocast: object
    device: torch.device
    log_file: MetricsLog
    engine: torch.nn.Module  # TokenLoss(model), under DDP or FSDP2 when world.size > 1
    method: object = None  # the registry's Method: saves what it trained
    world: dist.World = field(default_factory=dist.World)
    clips_gradients: bool = False  # the optimizer clips its own (projected) gradients; the loop must not
    params: list = field(default_factory=list)  # the trainable tensors, listed once (FSDP's, after sharding)
    peak: tuple | None = None  # (FLOP/s, name): the device's dense bf16 peak, where known, for MFU
    hooks: list = field(default_factory=list)
    flops: FlopMeter = field(default_factory=FlopMeter)
    step: int = 0
    cum_flops: float = 0.0  # train steps + hook work (held-out evaluation is not counted)
    cum_seconds: float = 0.0
    tokens_seen: int = 0
    stop_reason: str | None = None
    held_out_example: dict | None = None  # one test example, for the before/after generation
    generate_examples: list[dict] = field(default_factory=list)  # held-out prompts for the task metric
    validation_batches: list[dict] = field(default_factory=list)  # scored at the end, for choosing settings

    # ---- what hooks may use -------------------------------------------------------------------
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.params

    def tiny_loss(self) -> float:
        """Mean loss on the tiny held-out set; its FLOPs and seconds are charged to the run."""
        start = time.perf_counter()
        with self.flops.measure("tiny", flop_size(self.tiny_batches)):
            value = mean_loss(self.scorer, self.tiny_batches, self.autocast)
        self.add_cost(self.flops.last, time.perf_counter() - start)
        return value

    @property
    def scorer(self) -> torch.nn.Module:
        """What evaluations call: the loss module without DDP's per-forward collectives."""
        return dist.unwrap(self.engine)

    def add_cost(self, flops: float, seconds: float) -> None:
        """Charge work done on every rank: FLOPs add up over ranks, seconds are wall time."""
        self.cum_flops += flops * self.world.size
        self.cum_seconds += seconds

    def log(self, record: dict) -> None:
        if not self.world.main:
            return
        self.log_file.write({"step": self.step, "cum_flops": self.cum_flops, "cum_seconds": self.cum_seconds,
                             **record})

    # ---- the loop's own pieces ----------------------------------------------------------------
    def micro_batch(self) -> dict[str, torch.Tensor]:
        """This rank's slice of the next global micro-batch (batch_size x world examples)."""
        size, world = self.cfg.batch_size, self.world
        indices = self.stream.take(size * world.size)[world.rank * size:(world.rank + 1) * size]
        items = [self.train_items[i] for i in indices]
        if self.cfg.packing:
            return to_device(collate_packed(items, self.tokenizer.pad_token_id, self.cfg.max_length), self.device)
        return to_device(collate(items, self.tokenizer.pad_token_id), self.device)

    def test_loss(self) -> float:
        return mean_loss(self.scorer, self.test_batches, self.autocast)

    def validation_loss(self) -> float | None:
        """The loss settings are chosen on (validation_examples of the validation split); None when off."""
        return mean_loss(self.scorer, self.validation_batches, self.autocast) if self.validation_batches else None

    def state_dict(self) -> dict:
        """Every rank calls this (FSDP gathers); per-rank parts (RNG, hook state) are kept per rank."""
        per_rank = {"rng": runtime.rng_state(), "hooks": {h.name: h.state_dict() for h in self.hooks},
                    "flops": self.flops.state_dict()}
        return {"step": self.step, "world_size": self.world.size,
                "optimizer": dist.optimizer_state(self.world, self.engine, self.optimizer),
                "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
                "ranks": dist.gather_objects(self.world, per_rank),
                "cum_flops": self.cum_flops, "cum_seconds": self.cum_seconds, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        dist.load_optimizer_state(self.world, self.engine, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        ranks = state.get("ranks", [state])  # checkpoints from before per-rank state kept it at the top
        mine = ranks[self.world.rank] if len(ranks) == self.world.size else ranks[0]
        for hook in self.hooks:
            hook.load_state_dict(mine["hooks"].get(hook.name, {}))
        self.cum_flops, self.cum_seconds = state["cum_flops"], state["cum_seconds"]
        self.tokens_seen = state["tokens_seen"]
        runtime.set_rng_state(mine["rng"])
        self.flops.load_state_dict(mine.get("flops", {}))  # older checkpoints: count afresh

    def save(self) -> Path:
        """Write a checkpoint (rank 0) that every rank helped gather; a failed write stops all ranks."""
        method = self.method
        meta = {"method": self.cfg.method, "model": self.cfg.model, "config": self.cfg.to_dict(),
                "world_size": self.world.size}
        dist.reshard(self.world, self.engine)
        state = self.state_dict()
        error = None
        with dist.full_weights(self.world, self.model):
            if self.world.main:
                try:
                    ckpt.save_checkpoint(self.out, self.step, lambda p: method.save(self.model, p), state, meta)
                except OSError as e:
                    error = f"could not save the checkpoint at step {self.step} in {self.out}: {e}"
        error = dist.broadcast_object(self.world, error)
        if error is not None:
            raise CheckpointError(f"{error} (the previous checkpoint is intact; free space and resume=latest)")
        return ckpt.checkpoint_dir(self.out, self.step)


def _batches(tok, examples: list[dict], cfg: Config, device) -> list[dict]:
    items = encode_all(tok, examples, cfg.max_length)
    size = cfg.batch_size
    return [to_device(collate(items[i:i + size], tok.pad_token_id), device) for i in range(0, len(items), size)]


def build_run(plan: Plan | Config, say=print) -> Run:
    """Everything up to the first step: data, model, method, optimizer, schedule, hooks, resume. A Config is
    validated first; a Plan already was."""
    plan = plan if isinstance(plan, Plan) else validate(plan)
    cfg = plan.cfg
    world = dist.init(cfg)
    if not world.main:
        say = _silent
    out = Path(cfg.out)
    resume_from = plan.resume_from
    if world.main:
        _prepare_out(cfg, out)
    dist.barrier(world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # one seed on every rank: the same initial adapter, and the same draws in optimizers that sample
    # (LoRA-Pre's factors); dropout masks repeat across ranks, as under HF Trainer
    runtime.seed_everything(cfg.seed)
    device = dist.device_for(world, runtime.pick_device(cfg.device))

    if not world.main:
        hf_logging.disable_progress_bar()  # one set of bars, rank 0's
    tok = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data)
    train_items = encode_all(tok, splits.train, cfg.max_length)
    if not train_items:
        raise DataError(f"no training example of {cfg.data} fits in max_length={cfg.max_length} tokens")
    say(f"data: {len(train_items)} train / {len(splits.tiny)} tiny / {len(splits.test)} test examples")

    tiny_batches = _batches(tok, splits.tiny, cfg, device)
    test_batches = _batches(tok, splits.test[:cfg.eval_examples], cfg, device)
    if cfg.validation_examples and not splits.validation:
        raise DataError(f"{cfg.data} has no validation split (a datasets directory needs both 'test' and "
                        f"'validation'); set validation_examples=0")
    validation_batches = _batches(tok, splits.validation[:cfg.validation_examples], cfg, device)
    if not test_batches or (cfg.fast_forward and not tiny_batches):
        raise DataError(f"no held-out example of {cfg.data} fits in max_length={cfg.max_length} tokens; "
                        f"raise max_length")
    base = load_model(cfg.model)
    hf_logging.disable_progress_bar()  # from here on, our own bar is the one to watch
    method = plan.method
    if resume_from is not None:
        with _damaged(resume_from, "adapter"):
            model = method.load(base, resume_from / ckpt.ADAPTER, trainable=True)
    else:
        model = method.apply(base, plan.method_spec)
    model.to(device).train()
    n_train = sum(p.numel() for p in trainable_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    say(f"model: {cfg.model} | method {cfg.method}: {n_train:,} trainable of {n_all:,} ({100 * n_train / n_all:.2f}%)")
    engine = dist.parallelize(model, world, device, compile=cfg.compile)  # before the optimizer: FSDP replaces the parameters
    if world.size > 1:
        say(f"world: {world.size} processes ({cfg.parallel}, {torch.distributed.get_backend()}) | global batch "
            f"{cfg.batch_size} x {cfg.grad_accum} accum x {world.size} = "
            f"{cfg.batch_size * cfg.grad_accum * world.size} sequences per step | lr {cfg.lr:g} (not scaled)")

    optimizer = plan.optimizer.build(model, plan.optimizer_spec)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.schedule)
    autocast = runtime.autocast_for(cfg.precision, device)
    run = Run(cfg=cfg, out=out, model=model, tokenizer=tok, optimizer=optimizer, scheduler=scheduler,
              stream=ExampleStream(len(train_items), cfg.seed), train_items=train_items,
              tiny_batches=tiny_batches, test_batches=test_batches,
              autocast=autocast, device=device, hooks=build_hooks(plan.hooks), flops=FlopMeter(cfg.count_flops),
              log_file=MetricsLog(out / "metrics.jsonl",
                                  truncate_after_step=plan.resume_step,
                                  report_to=cfg.report_to,
                                  header={"kind": "model", "step": 0, "trainable_params": n_train, "params": n_all})
              if world.main else None,
              engine=engine, world=world, params=trainable_parameters(model), peak=runtime.peak_flops(device),
              method=method, clips_gradients=plan.optimizer.clips_gradients)
    run.held_out_example = min(splits.test, key=lambda ex: len(ex["messages"][-2]["content"]))
    run.generate_examples = splits.test[:cfg.eval_generate]
    run.validation_batches = validation_batches
    if resume_from is not None:
        with _damaged(resume_from, ckpt.STATE):
            state = ckpt.load_state(resume_from / ckpt.STATE)
        run.load_state_dict(state)
        say(f"resumed from {resume_from} at step {run.step}")
    if run.peak is not None and cfg.count_flops:
        say(f"MFU: measured FLOPs over the {run.peak[1]}'s dense bf16 peak, {run.peak[0] / 1e12:.0f} TFLOP/s")
    if world.main:
        save_config(cfg, out / "config.yaml")
    return run


@contextlib.contextmanager
def _damaged(checkpoint: Path, part: str):
    """Any failure to read a part of a checkpoint is reported as that checkpoint being damaged (or, for
    objects that only unpickling code could rebuild, refused)."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing the {part} of checkpoint {checkpoint}: it holds objects other than "
                              f"tensors and plain values, and loading them could run code; resume from a "
                              f"checkpoint rankwise wrote") from e
    except Exception as e:
        raise CheckpointError(f"cannot read the {part} of checkpoint {checkpoint} ({type(e).__name__}); it is "
                              f"damaged: resume from an earlier one (resume={checkpoint.parent}/step-N)") from e


def _silent(*_args, **_kwargs) -> None:
    """`say` on ranks other than 0."""


def _prepare_out(cfg: Config, out: Path) -> None:
    if cfg.overwrite and out.exists():
        for name in ("checkpoints", "latest", "metrics.jsonl", "loss.png", "config.yaml"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def train_step(run: Run) -> dict:
    """One optimizer step over grad_accum micro-batches; loss is the token-weighted mean over the global
    batch (all ranks): counts are summed first, and DDP/FSDP average gradients, hence the x world.
    The device is asked for one thing per step (the loss and gradient norm, together), after the
    backward passes are queued: nothing else waits on it."""
    cfg, world = run.cfg, run.world
    batches = [run.micro_batch() for _ in range(cfg.grad_accum)]
    n_labelled, n_tokens = dist.sum_all(world, sum(b["n_labelled"] for b in batches),
                                        sum(b["n_tokens"] for b in batches))
    start = time.perf_counter()
    flops = 0
    losses = []
    for i, b in enumerate(batches):
        with run.flops.measure("train", flop_size([b])):
            with dist.grad_sync(run.engine, world, sync=i == len(batches) - 1):
                with run.autocast():
                    loss_sum, _ = token_loss_sum(run.engine, b)
                (loss_sum * world.size / n_labelled).backward()
        flops += run.flops.last
        losses.append(loss_sum.detach().double())
    with run.flops.measure("update"):
        # an optimizer that clips its own (e.g. projected) gradients gets raw ones; the norm is still logged
        max_norm = cfg.clip if cfg.clip > 0 and not run.clips_gradients else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP's is a DTensor
        total, grad_norm = torch.stack([sum(losses), norm.double().to(losses[0].device)]).tolist()
        (total,) = dist.sum_all(world, total)
        loss = total / n_labelled
        if not math.isfinite(loss):
            kept = f"last good checkpoint kept in {run.out}" if (run.out / ckpt.LATEST).is_file() else \
                "no checkpoint was saved yet"
            raise TrainingDiverged(f"loss became {loss} at step {run.step + 1}; stopping ({kept}); "
                                   f"try a lower lr or precision=fp32")
        run.optimizer.step()
    flops += run.flops.last
    run.flops.last = flops  # the whole step, as Fast Forward's cost model reads it
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    if run.device.type == "cuda":  # the update's kernels are still queued: a step's time includes them
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    run.step += 1
    run.tokens_seen += int(n_tokens)
    run.add_cost(flops, seconds)
    padding = 1 - sum(b["n_tokens"] for b in batches) / sum(b["input_ids"].numel() for b in batches)
    record = {"kind": "train", "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "padding": padding,
              "tok_s": n_tokens / seconds, "flops": flops, "seconds": seconds}
    if run.peak is not None and flops:  # this rank's FLOPs over its own device's peak
        record["mfu"] = flops / seconds / run.peak[0]
    run.log(record)
    return record


class _StopOnSignal:
    """SIGINT / SIGTERM ask the loop to save and stop after the current step; a second SIGINT aborts."""

    def __init__(self, run: Run):
        self.run = run

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.run.stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.run.stop_reason = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


def train(plan: Plan | Config, say=print) -> dict:
    """Run the recipe (a Config is validated first); returns a summary (final held-out loss, steps, costs,
    output paths)."""
    run = build_run(plan, say)
    world = run.world
    try:
        return _loop(run, say if run.world.main else _silent)
    finally:
        if run.log_file is not None:
            run.log_file.close()
        del run  # the wrapped model holds the process group: let it go before the group does
        dist.shutdown(world)


def _sample(run: Run, label: str, say) -> str:
    from rankwise.generate import generate

    if not run.world.main or run.world.sharded:  # FSDP's shards only generate together; skip there
        return ""
    messages = run.held_out_example["messages"][:-1]
    text = generate(run.model, run.tokenizer, messages, max_new_tokens=48, autocast=run.autocast)
    say(f"--- {label} ---\n{text}")
    return text


def _loop(run: Run, say) -> dict:
    cfg = run.cfg
    fresh = run.step == 0
    if fresh:
        if cfg.sample:
            say(f"held-out function:\n{run.held_out_example['messages'][-2]['content']}\n"
                f"--- reference docstring ---\n{run.held_out_example['messages'][-1]['content']}")
            _sample(run, "before training", say)
        run.log({"kind": "eval", "eval_loss": run.test_loss()})
    for hook in run.hooks:
        hook.on_train_start(run)
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True,
               disable=not run.world.main)
    last = None
    with _StopOnSignal(run), bar:  # closed on any exit, so an error starts on its own line
        while run.step < cfg.steps and run.stop_reason is None:
            last = train_step(run)
            for hook in run.hooks:
                hook.after_step(run)
            if dist.any_all(run.world, run.stop_reason is not None):  # one rank signalled: all stop here
                run.stop_reason = run.stop_reason or "a signal to another rank"
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tok_s']:.0f}",
                            **({"mfu": f"{100 * last['mfu']:.1f}%"} if "mfu" in last else {}))
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                eval_loss = run.test_loss()
                run.log({"kind": "eval", "eval_loss": eval_loss})
                bar.write(f"step {run.step}: held-out loss {eval_loss:.4f}")
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps \
                    and run.stop_reason is None:  # a stop saves right below
                run.save()
    saved = run.save()
    if run.stop_reason is not None:
        say(f"stopped by {run.stop_reason} at step {run.step}; resume with: rankwise train resume={run.out} "
            f"(same config)")
        return {"stopped": run.stop_reason, "step": run.step, "checkpoint": str(saved)}
    final_loss = run.test_loss()
    run.log({"kind": "eval", "eval_loss": final_loss})
    validation_loss = run.validation_loss()
    if validation_loss is not None:
        run.log({"kind": "eval", "validation_loss": validation_loss})
    first_loss = None
    if run.world.main:
        records = read_metrics(run.out / "metrics.jsonl")
        first_loss = next(r["eval_loss"] for r in records if r.get("kind") == "eval")
        plot_losses(records, run.out / "loss.png", title=f"{cfg.method} on {cfg.data}")
        say(f"held-out loss: {first_loss:.4f} -> {final_loss:.4f} | {run.cum_flops / 1e12:.2f} TFLOPs, "
            f"{run.cum_seconds:.0f} s of training | adapter: {saved / ckpt.ADAPTER}")
    rouge = _task_metric(run, say)
    if cfg.sample:
        _sample(run, "after training", say)
    return {"step": run.step, "eval_loss_start": first_loss, "eval_loss": final_loss,
            "validation_loss": validation_loss, "rouge_l": rouge,
            "checkpoint": str(saved), "cum_flops": run.cum_flops, "cum_seconds": run.cum_seconds,
            "tokens_seen": run.tokens_seen}


def _task_metric(run: Run, say) -> float | None:
    """Mean ROUGE-L F1 of greedy replies to the first `eval_generate` held-out prompts (rank 0 only)."""
    if not run.generate_examples or not run.world.main or run.world.sharded:
        return None
    examples = run.generate_examples
    with tqdm(total=len(examples), desc="generate", unit="example", leave=False) as bar:
        rouge = mean_rouge_l(run.model, run.tokenizer, examples, run.autocast, progress=bar.update)
    run.log({"kind": "eval", "rouge_l": rouge, "generated": len(examples)})
    say(f"held-out ROUGE-L F1 (greedy replies to {len(examples)} prompts): {rouge:.4f}")
    return rouge
