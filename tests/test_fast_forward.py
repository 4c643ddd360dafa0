"""Fast Forward: the line searches, the stage's guarantees, back-off, exact state, the recipe hook,
the Trainer callback and the 2-process decision under torch.distributed."""
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from rankwise.config import ConfigError, load_config
from rankwise.fastforward import FastForward, FFOptions, line_search
from rankwise.hooks import check_hooks
from rankwise.train.metrics import read_metrics
from rankwise.recipes.train import train


# ---- toys ---------------------------------------------------------------------------------------
class Toy:
    """One tensor w taking fixed optimizer steps `delta`; the tiny loss is ||w - goal||^2."""

    def __init__(self, goal: float, delta: float = 0.1, n: int = 3, options=None):
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.goal = torch.full((n,), goal)
        self.delta = delta
        self.calls = 0
        self.ff = FastForward([self.w], self.loss, options)

    def loss(self) -> float:
        self.calls += 1
        return float(((self.w.detach() - self.goal) ** 2).sum())

    def step(self):
        with torch.no_grad():
            self.w.add_(self.delta)
        return self.ff.after_step()


def _run(toy: Toy, steps: int) -> list[dict]:
    return [(toy.ff.step, r) for r in (toy.step() for _ in range(steps)) if r is not None]


# ---- line searches ------------------------------------------------------------------------------
@pytest.mark.parametrize("minimum, doubling_evals", [(3.0, 5), (20.0, 8), (57.0, 10)])
def test_doubling_needs_fewer_evaluations_than_linear(minimum, doubling_evals):
    def f(s):
        return (s - minimum) ** 2

    doubling = line_search(f, "doubling", cap=128)
    linear = line_search(f, "linear", cap=128)
    assert linear.evals == minimum + 2  # f(0), f(1), ..., f(minimum + 1): one evaluation per step
    # f(0), f(1), the doublings up to the first rise (at most 2^(ceil(log2 minimum) + 1)), one refinement
    assert doubling.evals == doubling_evals <= math.ceil(math.log2(minimum)) + 4
    assert doubling.evals <= linear.evals  # 8 and 10 against 22 and 59; at 3 both take five
    assert doubling.loss_after <= linear.loss_after + 1e-9  # and lands at least as close to the minimum
    assert abs(doubling.kept_s - minimum) <= 0.5


def test_reference_search_keeps_the_worse_point_ours_do_not():
    def f(s):
        return (s - 2.0) ** 2

    ref = line_search(f, "reference", cap=32)
    assert ref.kept_s == 3 and ref.loss_after > f(2)  # the paper's code stops one step past the minimum
    for search in ("doubling", "linear"):
        r = line_search(f, search, cap=32)
        assert r.loss_after == min(v for _, v in r.points) == 0.0


def test_search_respects_cap():
    for search in ("doubling", "linear", "reference"):
        r = line_search(lambda s: -s, search, cap=5)
        assert r.kept_s == 5 and max(s for s, _ in r.points) <= 5


# ---- stage guarantees ---------------------------------------------------------------------------
@pytest.mark.parametrize("search", ["doubling", "linear"])
def test_stage_never_accepts_a_worse_point(search):
    toy = Toy(goal=-1.0, options={"interval": 2, "burn_in": 2, "search": search})  # steps walk away from goal
    before = toy.w.detach().clone()
    with torch.no_grad():
        toy.w.add_(toy.delta)
    toy.ff.after_step()
    w_t = toy.w.detach().clone()
    stage = toy.step()
    assert stage["accepted"] == 0 and stage["loss_after"] == stage["loss_before"]
    assert torch.equal(toy.w.detach(), w_t + toy.delta)  # exactly W_t: only the optimizer moved it
    assert not torch.equal(before, w_t)


# the goal is 4.5 steps away: linear stops at f(5), doubling brackets with f(8), then (parabolic) lands on 4.5
@pytest.mark.parametrize("search, refine, last_is_best", [("linear", "none", False), ("doubling", "none", False),
                                                          ("doubling", "parabolic", True)])
def test_stage_reverts_to_best(search, refine, last_is_best):
    toy = Toy(goal=0.75, delta=0.1, options={"interval": 3, "burn_in": 3, "search": search, "refine": refine,
                                             "cap": 32})
    stages = _run(toy, 3)
    (_, stage), = stages
    best_s, best = min(stage["points"], key=lambda point: (point[1], point[0]))
    assert stage["loss_after"] == best < stage["loss_before"] and stage["accepted"] == best_s
    assert max(s for s, _ in stage["points"]) > best_s  # the search went past the minimum ...
    assert (stage["points"][-1][1] == best) == last_is_best  # ... and (but for the refined one) ended worse,
    assert toy.loss() == pytest.approx(best, abs=1e-6)  # ... so the weights came back to the best point
    assert torch.allclose(toy.w.detach(), torch.full((3,), 0.3 + 0.1 * best_s))
    assert 0 < stage["accepted"] <= 32


def test_cap_respected_in_a_stage():
    toy = Toy(goal=100.0, options={"interval": 2, "burn_in": 2, "cap": 4})
    stages = _run(toy, 2)
    (_, stage), = stages
    assert stage["accepted"] == 4 and max(s for s, _ in stage["points"]) <= 4
    assert torch.allclose(toy.w.detach(), torch.full((3,), 0.2 + 4 * 0.1))


def test_back_off_stretches_interval_after_empty_stages_and_resets():
    toy = Toy(goal=-1.0, options={"interval": 2, "burn_in": 2, "backoff": 2.0, "max_interval": 8})
    stages = _run(toy, 30)
    steps = [s for s, _ in stages]
    assert all(r["accepted"] == 0 for _, r in stages)
    assert steps[:5] == [2, 6, 14, 22, 30]  # intervals 4, 8, then capped at 8
    assert [r["evals"] for _, r in stages] == [2] * 5  # an empty stage costs f(0) and f(1) only
    # a stage that pays puts the interval back
    toy.goal = torch.full((3,), 100.0)
    while toy.ff.step < toy.ff.next_stage - 1:
        toy.step()
    stage = toy.step()
    assert stage["accepted"] > 0 and toy.ff.interval == 2


def test_optimizer_state_and_schedule_untouched():
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ff = FastForward([w], lambda: float((w.detach() - 5).pow(2).sum()), {"interval": 2, "burn_in": 2})
    for _ in range(2):
        opt.zero_grad()
        ((w - 5) ** 2).sum().backward()
        opt.step()
        sched.step()
        state = {k: v.clone() for k, v in opt.state[w].items()}
        lr = sched.get_last_lr()
        stage = ff.after_step()
    assert stage is not None and stage["accepted"] > 0
    assert all(torch.equal(state[k], v) for k, v in opt.state[w].items()) and sched.get_last_lr() == lr


@pytest.mark.parametrize("direction", ["step", "interval"])
def test_state_dict_round_trip_continues_identically(direction):
    options = {"interval": 3, "burn_in": 3, "direction": direction, "backoff": 2.0}
    a = Toy(goal=0.9, delta=0.05, options=options)
    _run(a, 5)  # the next stage is at step 6: a snapshot is held now
    assert a.ff.snapshot is not None
    state = a.ff.state_dict()
    b = Toy(goal=0.9, delta=0.05, options=options)
    with torch.no_grad():
        b.w.copy_(a.w)
    b.ff.load_state_dict(state)
    ra, rb = _run(a, 20), _run(b, 20)
    assert ra == rb and torch.equal(a.w, b.w) and len(ra) >= 2


def test_interval_direction_is_the_mean_step():
    toy = Toy(goal=10.0, delta=0.1, options={"interval": 4, "burn_in": 4, "direction": "interval", "cap": 1})
    (_, stage), = _run(toy, 4)
    # snapshot after step 1, so the span is 3 steps of 0.1: s=1 moves exactly one mean step
    assert stage["span"] == 3 and torch.allclose(toy.w.detach(), torch.full((3,), 0.5))


# ---- config ---------------------------------------------------------------------------------------
def test_config_checks_ff_options():
    with pytest.raises(ConfigError, match="valid: interval, burn_in"):
        check_hooks(load_config(None, ["fast_forward=true", "ff.intervall=6"]))
    for bad in ("ff.interval=0", "ff.search=bisect", "ff.cap=0.5", "ff.backoff=0.5", "ff.direction=up",
                "ff.interval=2.5", "ff.tiny_examples=0"):
        with pytest.raises(ConfigError, match="ff\\."):
            check_hooks(load_config(None, ["fast_forward=true", bad]))
    check_hooks(load_config(None, ["fast_forward=true", "ff.interval=4", "ff.search=linear", "ff.cap=8"]))
    with pytest.raises(ValueError):
        FFOptions(interval=8, max_interval=4)


# ---- the recipe -----------------------------------------------------------------------------------
FF_ON = {"fast_forward": "true", "ff.interval": 2, "ff.burn_in": 2, "ff.tiny_examples": 4, "ff.backoff": 1.0,
         "threads": 1}


def _check_logged_search(r: dict) -> None:
    """A logged stage is its own search: f(0) first, and it ends at the lowest point it evaluated, strictly
    below f(0) exactly when it accepted a move."""
    assert r["points"][0] == [0.0, r["loss_before"]]
    assert [r["accepted"], r["loss_after"]] in r["points"] and r["loss_after"] == min(v for _, v in r["points"])
    assert (r["accepted"] > 0) == (r["loss_after"] < r["loss_before"])


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_recipe_logs_ff_stages_and_charges_them(tiny_cfg, method):
    lr = 1e-3 if method == "full" else 1e-2
    cfg = tiny_cfg(method=method, steps=4, lr=lr, schedule="constant", eval_every=0, **FF_ON)
    summary = train(cfg, say=lambda *_: None)
    records = read_metrics(f"{cfg.out}/metrics.jsonl")
    stages = [r for r in records if r["kind"] == "ff"]
    assert [r["step"] for r in stages] == [2, 4]
    for r in stages:
        assert r["evals"] == len(r["points"]) >= 2 and r["flops"] > 0
        _check_logged_search(r)
    assert stages[0]["accepted"] > 0  # at a constant lr the first direction pays
    train_flops = sum(r["flops"] for r in records if r["kind"] == "train")
    assert summary["cum_flops"] >= train_flops + sum(r["flops"] for r in stages) - 1
    assert math.isfinite(summary["eval_loss"])


def test_recipe_ff_lowers_the_held_out_loss_at_equal_optimizer_steps(tiny_cfg, tmp_path):
    # a low constant lr: 8 optimizer steps barely move the loss, and going further along each step must help
    common = dict(method="lora", steps=8, lr=1e-3, schedule="constant", warmup_steps=0, dropout=0.0,
                  eval_every=0)
    plain = train(tiny_cfg(out=str(tmp_path / "plain"), threads=1, **common), say=lambda *_: None)
    ff = train(tiny_cfg(out=str(tmp_path / "ff"), **common, **{**FF_ON, "ff.tiny_examples": 8}), say=lambda *_: None)
    records = read_metrics(tmp_path / "ff/metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert plain["step"] == ff["step"] == 8
    stages = [r for r in records if r["kind"] == "ff"]
    assert [r["step"] for r in stages] == [2, 4, 6, 8] and all(r["accepted"] > 0 for r in stages)
    for r in stages:
        _check_logged_search(r)
    assert ff["eval_loss_start"] == plain["eval_loss_start"]
    assert ff["eval_loss"] < plain["eval_loss"] - 0.02  # 7.52 against 7.60, from 7.62


def test_recipe_resume_with_ff_equals_uninterrupted(tiny_cfg, tmp_path):
    from safetensors.torch import load_file

    common = dict(steps=8, lr=1e-2, dropout=0.1, save_every=4, eval_every=0, fast_forward="true", threads=1,
                  **{"ff.interval": 3, "ff.burn_in": 2, "ff.direction": "interval", "ff.tiny_examples": 4})
    whole = train(tiny_cfg(out=str(tmp_path / "whole"), **common), say=lambda *_: None)
    split_out = tmp_path / "split"
    train(tiny_cfg(out=str(split_out), **common), say=lambda *_: None)
    resumed = train(tiny_cfg(out=str(split_out), resume=str(split_out / "checkpoints/step-000004"), **common),
                    say=lambda *_: None)
    a = load_file(f"{whole['checkpoint']}/adapter/adapter_model.safetensors")
    b = load_file(f"{resumed['checkpoint']}/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ff_whole = [r for r in read_metrics(tmp_path / "whole/metrics.jsonl") if r["kind"] == "ff"]
    ff_split = [r for r in read_metrics(split_out / "metrics.jsonl") if r["kind"] == "ff"]
    assert [r["step"] for r in ff_whole][:2] == [2, 5]  # stage 5 needs the snapshot held across the checkpoint
    key = ("step", "accepted", "loss_before", "loss_after", "evals")
    assert [[r[k] for k in key] for r in ff_whole] == [[r[k] for k in key] for r in ff_split]


# ---- transformers.Trainer ------------------------------------------------------------------------
def test_trainer_callback(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from rankwise.data import collate, encode_all, load_splits
    from rankwise.fastforward.callback import FastForwardCallback

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = load_splits("stdlib-docstrings")
    train_rows = encode_all(tok, splits.train[:64], 128)
    tiny_rows = encode_all(tok, splits.tiny[:8], 128)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True)
    ff = FastForwardCallback(tiny_rows, interval=2, burn_in=2, backoff=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows,
                      data_collator=lambda rows: collate(rows, tok.pad_token_id), callbacks=[ff])
    trainer.train()
    assert [r["step"] for r in ff.records] == [2, 4, 6]
    assert all(r["loss_after"] <= r["loss_before"] and r["evals"] >= 2 for r in ff.records)
    # a stage that moved the weights reports the lower loss it moved to; one that did not, the same loss
    assert all((r["accepted"] > 0) == (r["loss_after"] < r["loss_before"]) for r in ff.records)
    assert any(r["accepted"] > 0 for r in ff.records)


# ---- torch.distributed --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    from rankwise.train.dist import World, shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same init on every rank
    base = torch.nn.Linear(8, 8).requires_grad_(False)
    A = torch.nn.Parameter(torch.randn(2, 8) * 0.1)
    B = torch.nn.Parameter(torch.zeros(8, 2))

    class Adapted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.A, self.B = base, A, B

        def forward(self, x):
            return self.base(x) + x @ self.A.T @ self.B.T

    model = torch.nn.parallel.DistributedDataParallel(Adapted())
    opt = torch.optim.AdamW([A, B], lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(7))
    tiny_x = torch.randn(16, 8, generator=g)
    local = []

    def tiny_loss():
        with torch.no_grad():
            value = float(((model.module(tiny_x) - tiny_x @ target.T) ** 2).mean())
        local.append(value)
        return value

    ff = FastForward([A, B], tiny_loss, {"interval": 3, "burn_in": 3})
    accepted = 0.0
    for _ in range(15):
        x = torch.randn(32, 8, generator=g)
        loss = ((model(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stage = ff.after_step()
        accepted += stage["accepted"] if stage else 0.0
    torch.save({"A": A.detach(), "B": B.detach(), "local": local, "accepted": accepted}, f"{out}/rank{rank}.pt")
    del model, ff  # a DDP wrapper alive at exit, after the group is gone, can abort the process
    shutdown(World(rank=rank, size=world))


def test_distributed_ranks_take_the_same_decisions(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["local"] != r1["local"]  # each rank's own tiny loss differs ...
    assert r0["accepted"] == r1["accepted"] > 0  # ... yet they accept the same FF steps
    assert torch.equal(r0["A"], r1["A"]) and torch.equal(r0["B"], r1["B"])


def test_interval_one_stages_after_every_step_once_a_direction_exists():
    toy = Toy(goal=100.0, options={"interval": 1, "burn_in": 1, "cap": 2})
    assert [s for s, _ in _run(toy, 6)] == [2, 3, 4, 5, 6]


def test_warm_start_saves_evaluations_and_recovers_from_overshoot():
    def f(s):
        return (s - 20.0) ** 2

    cold, warm = line_search(f, "doubling", cap=64), line_search(f, "doubling", cap=64, start=16)
    assert warm.evals < cold.evals and abs(warm.kept_s - 20) <= 0.5
    bad = line_search(lambda s: (s - 1.5) ** 2, "doubling", cap=64, start=32)  # the previous answer overshoots
    assert bad.kept_s == pytest.approx(1.5) and bad.evals <= 5


def test_trainer_callback_resumes_its_state(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from rankwise.data import collate, encode_all, load_splits
    from rankwise.fastforward.callback import FastForwardCallback

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = load_splits("stdlib-docstrings")
    train_rows, tiny_rows = encode_all(tok, splits.train[:64], 128), encode_all(tok, splits.tiny[:8], 128)

    def run(resume=None):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=6,
                                 learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_steps=4,
                                 logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        ff = FastForwardCallback(tiny_rows, interval=3, burn_in=2, direction="interval", backoff=1.0)
        trainer = Trainer(model=model, args=args, train_dataset=train_rows,
                          data_collator=lambda rows: collate(rows, tok.pad_token_id), callbacks=[ff])
        trainer.train(resume_from_checkpoint=resume)
        return ff

    whole = run()
    assert (tmp_path / "hf/checkpoint-4/fast_forward.pt").is_file()
    resumed = run(str(tmp_path / "hf/checkpoint-4"))
    assert [r["step"] for r in whole.records] == [2, 5]  # stage 5's direction starts before the checkpoint
    assert resumed.ff.stages == whole.ff.stages and [r["step"] for r in resumed.records] == [5]
    assert resumed.records[0]["accepted"] == pytest.approx(whole.records[1]["accepted"], rel=1e-4)


def test_stage_that_does_not_pay_for_its_evaluations_backs_off():
    options = {"interval": 2, "burn_in": 2, "backoff": 2.0}
    cheap, dear = Toy(goal=0.35, options={**options, "eval_cost": 0.1}), Toy(goal=0.35, options={**options, "eval_cost": 1.0})
    (_, a), = _run(cheap, 2)
    (_, b), = _run(dear, 2)
    assert a["accepted"] == b["accepted"] == pytest.approx(1.5) and a["evals"] == b["evals"] == 4
    assert a["pays"] and cheap.ff.interval == 2  # 1.5 FF steps > 4 evaluations x 0.1 step
    assert not b["pays"] and dear.ff.interval == 4  # 1.5 FF steps < 4 evaluations x 1 step
    with pytest.raises(ConfigError, match="eval_cost"):
        check_hooks(load_config(None, ["fast_forward=true", "ff.eval_cost=-1"]))


def test_bench_reuses_only_a_finished_run_of_the_same_config(tiny_cfg):
    from rankwise.bench._harness import config_settings, finished_runs, run_key
    from rankwise.recipes.train import train

    cfg = tiny_cfg(steps=2, eval_every=0)
    train(cfg, say=lambda *_: None)
    found = finished_runs(Path(cfg.out).parent)
    key = lambda c: run_key(config_settings(c.to_dict()))  # noqa: E731
    assert found == {key(cfg): Path(cfg.out)}
    assert key(tiny_cfg(steps=2, eval_every=0, lr=1e-3)) not in found  # another config
    assert key(tiny_cfg(steps=3, eval_every=0)) not in found  # not the run that finished
