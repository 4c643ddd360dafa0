"""LoFT: full-rank equality with AdamW, the projection identities, alpha invariance, exact resume."""
import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import rankwise.optim.loft as loft_module
from rankwise.config import ConfigError
from rankwise.optim import LoFT, get_optimizer
from rankwise.optim.loft_math import congruence, packed_index, packed_outer, quad_basis, ridge_inverse, unpack
from rankwise.recipes.train import train

F64 = torch.float64


def _loss(W, X, Y):
    return ((torch.tanh(X @ W.T) - Y) ** 2).mean()


def _race(n=8, steps=100, weight_decay=0.0, zero_base=True, max_grad_norm=0.0, seed=0):
    """LoFT on W = W0 + B·A (full rank) against torch AdamW on W; largest relative gap over the steps."""
    gen = torch.Generator().manual_seed(seed)

    def near_identity():  # keeps W, and so both factors, well conditioned along the whole path
        return torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=gen, dtype=F64) / n ** 0.5

    W0 = torch.zeros(n, n, dtype=F64) if zero_base else torch.randn(n, n, generator=gen, dtype=F64)
    A, B = torch.nn.Parameter(near_identity()), torch.nn.Parameter(near_identity())
    W = torch.nn.Parameter((W0 + B @ A).detach().clone())
    start = (B @ A).detach()
    target = W0 + near_identity()
    opts = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    reference = torch.optim.AdamW([W], **opts)
    loft = LoFT([(A, B, 1.0)], ridge=1e-15, max_grad_norm=max_grad_norm, **opts)
    worst = 0.0
    for _ in range(steps):
        X = torch.randn(16, n, generator=gen, dtype=F64)
        Y = torch.tanh(X @ target.T) + 0.1 * torch.randn(16, n, generator=gen, dtype=F64)
        reference.zero_grad()
        _loss(W, X, Y).backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([W], max_grad_norm)
        reference.step()
        loft.zero_grad()
        _loss(W0 + B @ A, X, Y).backward()
        loft.step()
        with torch.no_grad():
            worst = max(worst, float((W0 + B @ A - W).norm() / W.norm()))
    assert float((W.detach() - W0 - start).norm()) > 0.1  # the weights really moved
    return worst


@pytest.mark.parametrize("weight_decay, zero_base", [(0.1, True), (0.0, False)])
def test_full_rank_loft_is_adamw_on_w(weight_decay, zero_base):
    worst = _race(weight_decay=weight_decay, zero_base=zero_base)
    assert worst < 1e-6


def test_full_rank_clipping_acts_on_the_full_gradient():
    worst = _race(max_grad_norm=0.05, steps=40)
    assert worst < 1e-6


def test_released_transport_order_drifts(monkeypatch):
    # the reference code transports P as C P Cᵀ; the full-rank race must catch that
    monkeypatch.setattr(loft_module, "congruence", lambda C, k, l: congruence(C.T, k, l))
    worst = _race(steps=60)
    assert worst > 1e-2


def test_projection_identities():
    gen = torch.Generator().manual_seed(3)
    m, n, r, s = 12, 7, 3, 2.5
    A = torch.randn(r, n, generator=gen, dtype=F64)
    B = torch.randn(m, r, generator=gen, dtype=F64)
    G = torch.randn(m, n, generator=gen, dtype=F64)
    g_B, g_A = s * G @ A.T, s * B.T @ G  # what autograd gives for W = W0 + s·B·A
    _, inv_A = ridge_inverse(A, 1e-14)
    _, inv_B = ridge_inverse((s * B).T, 1e-14)
    g_tilde_B = (g_B / s) @ inv_A
    g_tilde_A = (g_A.T @ inv_B).T
    P_A = torch.linalg.pinv(A) @ A
    P_B = B @ torch.linalg.pinv(B)
    torch.testing.assert_close(g_tilde_B @ A, G @ P_A)
    torch.testing.assert_close((s * B) @ g_tilde_A, P_B @ G)


def test_packed_second_moment_algebra():
    gen = torch.Generator().manual_seed(4)
    r, p, q = 4, 5, 6
    k, l, w = packed_index(r, "cpu")
    g = torch.randn(p, r, generator=gen, dtype=F64)
    P = packed_outer(g, k, l)
    full = unpack(P, r, k, l)
    torch.testing.assert_close(full, g[:, :, None] * g[:, None, :])
    R = torch.randn(r, q, generator=gen, dtype=F64)
    torch.testing.assert_close(P @ quad_basis(R, k, l, w), torch.einsum("iab,aj,bj->ij", full, R, R))
    C = torch.randn(r, r, generator=gen, dtype=F64)
    torch.testing.assert_close(unpack(P @ congruence(C, k, l), r, k, l), C.T @ full @ C)


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 9)
        self.fc2 = torch.nn.Linear(9, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _peft(alpha=8.0, seed=0, **extra):
    torch.manual_seed(seed)
    base = TwoLayer().double()
    config = LoraConfig(r=3, lora_alpha=alpha, target_modules=["fc1", "fc2"], **extra)
    return get_peft_model(base, config).double()


def _train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 10, generator=gen, dtype=F64), torch.randn(32, 4, generator=gen, dtype=F64)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _deltas(model):
    return [m.get_delta_weight("default").detach() for m in model.modules() if hasattr(m, "get_delta_weight")]


@pytest.mark.parametrize("simple", [False, True])
def test_alpha_does_not_change_the_dynamics(simple):
    runs = []
    for alpha in (1.0, 64.0):
        model = _peft(alpha=alpha)
        _train(model, LoFT.from_peft_model(model, lr=1e-2, simple=simple, max_grad_norm=0.5), steps=20)
        runs.append(_deltas(model))
    assert len(runs[0]) == 2
    for small, large in zip(*runs):
        assert float(small.norm()) > 1e-3  # it did move
        torch.testing.assert_close(small, large, rtol=1e-9, atol=1e-12)


def test_pairs_come_from_modules_and_the_rest_gets_adamw():
    model = _peft(bias="lora_only")  # makes the adapted layers' biases trainable
    opt = LoFT.from_peft_model(model, lr=1e-2)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert [(id(A), id(B)) for A, B, _ in opt._pairs] == [
        (id(m.lora_A["default"].weight), id(m.lora_B["default"].weight)) for m in layers]
    biases = [m.base_layer.bias for m in layers]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in biases]
    twins = [torch.nn.Parameter(b.detach().clone()) for b in biases]
    reference = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 10, generator=gen, dtype=F64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        for twin, b in zip(twins, biases):
            twin.grad = b.grad.clone()
        opt.step()
        reference.step()
    for twin, b in zip(twins, biases):
        torch.testing.assert_close(b, twin)


def test_dora_is_refused():
    with pytest.raises(ValueError, match="DoRA"):
        LoFT.from_peft_model(_peft(use_dora=True))


@pytest.mark.parametrize("simple", [False, True])
def test_state_dict_round_trip_continues_exactly(simple):
    model = _peft()
    opt = LoFT.from_peft_model(model, lr=1e-2, simple=simple, weight_decay=0.01, max_grad_norm=1.0)
    _train(model, opt, steps=5)  # odd: the next step moves A and must transport B's moments
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    straight = _train(model, opt, steps=4, seed=7)

    again = _peft(seed=123)  # different init, overwritten by the load
    again.load_state_dict(saved_model)
    opt2 = LoFT.from_peft_model(again, lr=1e-2, simple=simple, weight_decay=0.01, max_grad_norm=1.0)
    opt2.load_state_dict(saved_opt)
    resumed = _train(again, opt2, steps=4, seed=7)
    assert resumed == straight
    for a, b in zip(_deltas(model), _deltas(again)):
        assert torch.equal(a, b)


# ---- in the recipe ---------------------------------------------------------------------------------
def test_check_refuses_what_cannot_work(tiny_cfg):
    check = get_optimizer("loft").check
    with pytest.raises(ConfigError, match="LoRA factors"):
        check(tiny_cfg(optimizer="loft", method="full", clip=0))
    check(tiny_cfg(optimizer="loft", clip=1.0))  # the recipe's clip becomes LoFT's projected-gradient clip
    with pytest.raises(ConfigError, match="does not take"):
        check(tiny_cfg(optimizer="loft", clip=0, **{"optimizer_args.betas2": 0.9}))
    with pytest.raises(ConfigError, match="true or false"):
        check(tiny_cfg(optimizer="loft", clip=0, **{"optimizer_args.simple": 3}))
    check(tiny_cfg(optimizer="loft", clip=0, **{"optimizer_args.simple": True}))


def test_recipe_learns_and_resumes_exactly(tiny_cfg, tmp_path):
    common = dict(optimizer="loft", clip=0, steps=6, save_every=3, lr=3e-3, eval_every=0)
    whole = train(tiny_cfg(out=str(tmp_path / "whole"), **common), say=lambda *_: None)
    assert whole["eval_loss"] < whole["eval_loss_start"] - 0.05
    resumed = train(tiny_cfg(out=str(tmp_path / "split"), resume=str(tmp_path / "whole/checkpoints/step-000003"),
                             **common), say=lambda *_: None)
    a = load_file(f"{whole['checkpoint']}/adapter/adapter_model.safetensors")
    b = load_file(f"{resumed['checkpoint']}/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["eval_loss"] == whole["eval_loss"]


def test_recipe_clip_becomes_loft_max_grad_norm(tiny_cfg):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rankwise.methods import get_method

    cfg = tiny_cfg(optimizer="loft", clip=0.5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg.model), get_method("lora").lora_config(cfg))
    opt = get_optimizer("loft").build(model, cfg)
    assert all(g["max_grad_norm"] == 0.5 for g in opt.param_groups)
    assert opt.clips_gradients  # so the recipe leaves raw gradients unclipped


def test_fast_forward_runs_on_loft_moves(tiny_cfg):
    from rankwise.train.metrics import read_metrics
    from rankwise.recipes.train import train

    cfg = tiny_cfg(optimizer="loft", steps=12, lr=3e-3, schedule="constant", fast_forward=True,
                   **{"ff.interval": 3, "ff.burn_in": 3})
    summary = train(cfg, say=lambda *_: None)
    stages = [r for r in read_metrics(f"{cfg.out}/metrics.jsonl") if r["kind"] == "ff"]
    assert stages and all(r["loss_after"] <= r["loss_before"] for r in stages)
    assert stages[0]["accepted"] > 0  # LoFT's step is a direction worth extending
    for r in stages:  # each logged stage ends at the lowest point of its search, below f(0) iff it moved
        assert r["points"][0] == [0.0, r["loss_before"]] and [r["accepted"], r["loss_after"]] in r["points"]
        assert r["loss_after"] == min(v for _, v in r["points"])
        assert (r["accepted"] > 0) == (r["loss_after"] < r["loss_before"])
    assert summary["eval_loss"] < summary["eval_loss_start"]


def test_bench_summary_takes_each_sweeps_best_and_the_gap_it_closes():
    from rankwise.bench.loft import summarize

    rows = [{"label": "full", "rank": None, "eval_loss": 2.0},
            {"label": "loft lr=0.0001", "rank": 1, "eval_loss": 2.6},
            {"label": "loft lr=0.0003", "rank": 1, "eval_loss": 2.4},
            {"label": "loft-simple lr=0.001", "rank": 1, "eval_loss": 2.9},
            {"label": "lora lr=0.001 a=2r", "rank": 1, "eval_loss": 3.0},
            {"label": "lora lr=0.002 a=2r", "rank": 1, "eval_loss": 2.8},
            {"label": "lora lr=0.004 a=2r", "rank": 1, "error": "the run's process died"}]
    (line,) = summarize(rows)
    assert (line["lora"], line["loft"], line["loft-simple"], line["dora"]) == (2.8, 2.4, 2.9, None)
    assert line["lora_label"] == "lora lr=0.002 a=2r"
    assert line["gap_closed"] == pytest.approx(0.5)  # (2.8 - 2.4) / (2.8 - 2.0)


def test_bench_reuse_keeps_finished_runs_only_for_the_same_settings(tmp_path):
    from rankwise.bench import write_json
    from rankwise.bench.loft import _reusable

    out = tmp_path / "loft.json"
    settings = ["model=default", "batch_size=8", "steps=30"]
    done = {"label": "lora", "rank": 1, "overrides": ["method=lora", "rank=1"], "eval_loss": 2.5}
    failed = {"label": "loft", "rank": 1, "overrides": ["method=lora", "optimizer=loft"], "error": "x"}
    write_json(out, {"partial": True, "common": settings, "rows": [done, failed]})
    assert _reusable(str(out), settings) == {json.dumps(done["overrides"]): done}  # the failed run reruns
    assert _reusable(str(tmp_path / "absent.json"), settings) == {}
    with pytest.raises(SystemExit, match="other settings"):
        _reusable(str(out), ["model=default", "batch_size=8", "steps=60"])


@pytest.mark.parametrize("args", [["--lr", "1e-3,fast"], ["--loft-lrs", "0"], ["--ranks", "1,two"],
                                  ["--lora-sweep", "1e-3"], ["--lora-sweep", "1e-3:x"], ["--lr-simple", "-1"],
                                  ["--seed", "-1"]])
def test_bench_refuses_bad_sweeps_in_one_line_before_loading(args, capsys):
    from rankwise.bench.loft import main

    with pytest.raises(SystemExit) as stop:
        main(["--memory-rank", "0", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {args[0]}" in err and "Traceback" not in err


def test_bench_plot_draws_each_ranks_sweeps_from_a_result_file(tmp_path):
    from rankwise.bench.loft_plot import plot_sweeps, sweeps

    rows = json.loads((Path(__file__).parents[1] / "docs/results/loft-default.json").read_text())["rows"]
    at_one = sweeps(rows, 1)
    assert set(at_one) == {"loft", "loft-simple", "lora a=2r", "dora"}
    assert [lr for lr, _ in at_one["loft"]] == sorted(lr for lr, _ in at_one["loft"])  # a line, left to right
    assert len(sweeps(rows, None)["full"]) == 3
    png = tmp_path / "plots" / "loft.png"
    assert plot_sweeps(rows, png) == [1, 2, 4, 16]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(png.parent.glob("*.tmp.png"))


def test_bench_replot_draws_a_saved_file_without_training(tmp_path, capsys):
    from rankwise.bench.loft import main as bench_loft
    from rankwise.bench.loft_plot import sweeps

    source = Path(__file__).parents[1] / "docs/results/loft-default-alpha.json"
    rows = json.loads(source.read_text())["rows"]
    assert {"lora a=1r", "lora a=2r", "lora a=4r"} <= set(sweeps(rows, 2))  # one line per alpha
    png = tmp_path / "replot.png"
    assert bench_loft(["--replot", str(source), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and "ranks 1, 2, 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # nothing to draw into
        bench_loft(["--replot", str(source)])
    with pytest.raises(SystemExit):
        bench_loft(["--replot", str(tmp_path / "missing.json"), "--plot", str(png)])


def test_bench_tiny_trains_each_run_in_its_own_process_and_keeps_the_results(tmp_path, capfd):
    from rankwise.bench.loft import main as bench_loft

    out = tmp_path / "tiny.json"
    assert bench_loft(["--scale", "tiny", "--ranks", "1", "--steps", "2", "--methods", "loft,lora",
                       "--loft-lrs", "1e-3", "--lora-sweep", "4e-3:2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert not result.get("partial")
    rows = {r["label"].split(" ")[0]: r for r in result["rows"]}
    assert set(rows) == {"loft", "lora"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["steps"] == 2 and row["optimizer_state_mb"] > 0
        # the peak is this process's, in MiB, reset before the steps: above what was resident then (the steps
        # allocate activations and gradients: ~30 MiB here), far below a GiB more
        assert row["rss_before_mb"] < row["peak_mb"] < row["rss_before_mb"] + 1024
        assert row["eval_loss"] < rows["loft"]["eval_loss_start"] + 0.5  # trained, not diverged
    assert "[2/2] lora" in capfd.readouterr().err  # each run's progress bar names it
    assert "seed=0" in result["common"]
    again = tmp_path / "seed3.json"
    assert bench_loft(["--scale", "tiny", "--ranks", "1", "--steps", "2", "--methods", "lora", "--lora-sweep", "4e-3:2",
                       "--seed", "3", "--out", str(again)]) == 0
    other = json.loads(again.read_text())
    assert "seed=3" in other["common"] and other["rows"][0]["eval_loss"] != rows["lora"]["eval_loss"]
    with pytest.raises(SystemExit, match="other settings"):  # a seed-0 file is not reused for seed 3
        bench_loft(["--scale", "tiny", "--ranks", "1", "--steps", "2", "--methods", "lora", "--lora-sweep", "4e-3:2",
                    "--seed", "3", "--out", str(out), "--reuse"])


# ---- batched steps ---------------------------------------------------------------------------------
# (r, n, m, scale): repeated shapes share a batch, a different scale or rank does not
PAIR_SHAPES = [(3, 7, 5, 2.0), (2, 6, 9, 1.0), (3, 7, 5, 2.0), (3, 7, 5, 0.5), (2, 6, 9, 1.0), (3, 7, 5, 2.0),
               (4, 5, 5, 1.0)]


def _pair_zoo(seed=0):
    gen = torch.Generator().manual_seed(seed)
    pairs = [(torch.nn.Parameter(torch.randn(r, n, generator=gen) / n ** 0.5),
              torch.nn.Parameter(torch.randn(m, r, generator=gen) / r ** 0.5), s) for r, n, m, s in PAIR_SHAPES]
    bias = torch.nn.Parameter(torch.randn(4, generator=gen))
    return pairs, bias


def _zoo_grads(pairs, bias, gen):
    """Each pair's own loss (so each pair's gradients do not depend on the others), summed."""
    loss = (bias - 1).square().sum()
    for A, B, s in pairs:
        X = torch.randn(8, A.shape[1], generator=gen, dtype=A.dtype)
        Y = torch.randn(8, B.shape[0], generator=gen, dtype=A.dtype)
        loss = loss + (torch.tanh(X @ (s * B @ A).T) - Y).square().mean()
    for p in [bias, *(t for A, B, _ in pairs for t in (A, B))]:
        p.grad = None
    loss.backward()


@pytest.mark.parametrize("simple", [False, True])
@pytest.mark.parametrize("limit", [None, 80])  # 80 elements: batches of one or two pairs
def test_batched_step_equals_one_optimizer_per_pair(simple, limit, monkeypatch):
    import rankwise.optim.batched as batched_module

    if limit is not None:
        monkeypatch.setattr(batched_module, "MAX_BATCH_ELEMENTS", limit)
    pairs, bias = _pair_zoo()
    twins, twin_bias = copy.deepcopy((pairs, bias))
    start = [B.detach().clone() for _, B, _ in pairs]
    opts = dict(lr=1e-2, weight_decay=0.05, simple=simple)
    together = LoFT(pairs, [bias], **opts)
    alone = [LoFT([pair], [twin_bias] if i == 0 else [], **opts) for i, pair in enumerate(twins)]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 10):
        _zoo_grads(pairs, bias, gen)
        for (A, B, _), (A2, B2, _) in zip(pairs, twins):
            A2.grad, B2.grad = A.grad.clone(), B.grad.clone()
        twin_bias.grad = bias.grad.clone()
        if step == 4:  # pair 0's A moves outside the optimizer: only its B side (inactive now) transports
            for A in (pairs[0][0], twins[0][0]):
                A.data.add_(0.01)
        if step == 6:  # pair 2 skips a step, so its step count (and parity) parts from its batch-mates'
            for A, B, _ in (pairs[2], twins[2]):
                A.grad = B.grad = None
        together.step()
        for opt in alone:
            opt.step()
    for (A, B, _), (A2, B2, _) in zip(pairs, twins):
        torch.testing.assert_close(A, A2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(B, B2, rtol=1e-6, atol=1e-7)
        for p, p2 in ((A, A2), (B, B2)):
            ours = together.state[p]
            theirs = next(o.state[p2] for o in alone if p2 in o.state)
            assert ours.keys() == theirs.keys() and ours["step"] == theirs["step"]
            for key in ours:
                if torch.is_tensor(ours[key]):
                    torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, twin_bias, rtol=1e-6, atol=1e-7)
    assert all(float((B.detach() - B0).norm()) > 1e-3 for (_, B, _), B0 in zip(pairs, start))  # they all moved
    assert together.state[pairs[2][1]]["step"] == 8 and together.state[pairs[0][1]]["step"] == 9
