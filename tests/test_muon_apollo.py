"""optimizer=muon (torch's Muon on the matrices, AdamW on the rest, one optimizer) and optimizer=apollo
(apollo-torch's APOLLO on full weights): the split, equality with the torch/package optimizers stepped by
hand, schedulers, exact resume through the recipe, one-line refusals, and the bench's tiny runs."""
from __future__ import annotations

import copy
import importlib.util
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from rankwise import models
from rankwise.config import ConfigError
from rankwise.methods import get_method
from rankwise.optim import OptimizerSpec, get_optimizer, optimizer_state_bytes
from rankwise.optim.apollo import ApolloOptions, apollo_adamw_class
from rankwise.optim.muon import MuonAdamW, MuonOptions
from rankwise.recipes.train import train
from rankwise.tiny import tiny_llama
from rankwise.train import checkpoint as ckpt
from rankwise.train.schedule import build_scheduler
from rankwise.validate import validate


def _grads(model, gen):
    """Seeded random gradients for every trainable tensor (the same in a twin built by deepcopy)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)


def _muon(model, **options) -> MuonAdamW:
    return get_optimizer("muon").build(model, OptimizerSpec(lr=2e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                                            options=MuonOptions(**options)))


# ---- muon --------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"momentum": 0.8, "nesterov": False, "ns_steps": 3, "eps": 1e-5}])
def test_steps_equal_torch_muon_and_adamw_stepped_by_hand(options):
    model = tiny_llama(300)
    twin = copy.deepcopy(model)
    opt = _muon(model, **options)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = [names[id(p)] for p in opt.parts["muon"].param_groups[0]["params"]]
    adamw_names = [names[id(p)] for p in opt.parts["adamw"].param_groups[0]["params"]]
    # the decoder blocks' Linear weights to Muon; embeddings, norms and the head to AdamW
    assert muon_names == [n for n in names.values() if ".layers." in n and n.endswith("proj.weight")]
    assert sorted(adamw_names) == sorted(set(names.values()) - set(muon_names))
    assert "model.embed_tokens.weight" in adamw_names  # (tied: the head too)
    twins = dict(twin.named_parameters())
    torch_options = {"momentum": options.get("momentum", 0.95), "nesterov": options.get("nesterov", True),
                     "ns_steps": options.get("ns_steps", 5)} | ({"eps": options["eps"]} if "eps" in options else {})
    by_hand = [torch.optim.Muon([twins[n] for n in muon_names], lr=2e-2, weight_decay=0.1,
                                adjust_lr_fn="match_rms_adamw", **torch_options),
               torch.optim.AdamW([twins[n] for n in adamw_names], lr=2e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                 foreach=True)]
    for step in range(3):
        _grads(model, torch.Generator().manual_seed(step))
        _grads(twin, torch.Generator().manual_seed(step))
        opt.step()
        for o in by_hand:
            o.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, twins[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(model.lm_head.weight, tiny_llama(300).lm_head.weight)  # it moved


@pytest.mark.parametrize("method, in_adamw", [("lora", set()), ("dora", {"lora_magnitude_vector"}),
                                              ("lora-fa", set())])
def test_adapter_methods_give_muon_their_factors(method, in_adamw, tiny_cfg):
    cfg = tiny_cfg(method=method, optimizer="muon")
    model = get_method(method).apply(tiny_llama(300), cfg)
    opt = get_optimizer("muon").build(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    muon = {names[id(p)] for p in opt.parts["muon"].param_groups[0]["params"]}
    assert muon and all(".lora_A." in n or ".lora_B." in n for n in muon)
    rest = trainable - muon
    assert bool(rest) == bool(in_adamw) and all(any(k in n for k in in_adamw) for n in rest)
    assert set(opt.parts) == ({"muon", "adamw"} if in_adamw else {"muon"})


def test_a_scheduler_moves_both_parts_also_after_a_load():
    model = tiny_llama(300)
    opt = _muon(model)
    sched = build_scheduler(opt, total=10, warmup=4, kind="cosine")
    for step in range(3):
        _grads(model, torch.Generator().manual_seed(step))
        opt.step()
        sched.step()
        lrs = {name: part.param_groups[0]["lr"] for name, part in opt.parts.items()}
        assert lrs["muon"] == lrs["adamw"] == pytest.approx(2e-2 * (step + 2) / 4)
    again = _muon(tiny_llama(300))
    again_sched = build_scheduler(again, total=10, warmup=4, kind="cosine")
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    again_sched.load_state_dict(sched.state_dict())
    for _ in range(3):  # into the cosine decay: must reach the children's groups loaded from the state dict
        sched.step()
        again_sched.step()
        want = sched.get_last_lr()[0]
        assert [part.param_groups[0]["lr"] for part in again.parts.values()] == [want] * 2
    assert want < 0.9 * 2e-2


def test_state_dict_round_trip_continues_exactly():
    model = tiny_llama(300)
    opt = _muon(model)
    for step in range(3):
        _grads(model, torch.Generator().manual_seed(step))
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert optimizer_state_bytes(opt) > 0 and set(saved_opt) == {"muon", "adamw"}
    again = tiny_llama(300, seed=5)
    again.load_state_dict(saved_model)
    opt2 = _muon(again)
    opt2.load_state_dict(pickle.loads(pickle.dumps(saved_opt)))
    for step in range(3, 6):
        for m in (model, again):
            _grads(m, torch.Generator().manual_seed(step))
        opt.step()
        opt2.step()
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="parts"):
        opt2.load_state_dict({"muon": saved_opt["muon"]})


def _resume_equals_uninterrupted(tiny_cfg, tmp_path, **common):
    common = dict(steps=6, lr=3e-3, save_every=3, eval_every=0) | common
    whole = train(tiny_cfg(out=str(tmp_path / "whole"), **common), say=lambda *_: None)
    split = tmp_path / "split"
    train(tiny_cfg(out=str(split), **common), say=lambda *_: None)
    ckpt.load_state(split / "checkpoints/step-000003/state.pt")  # weights_only, with the allow-list
    resumed = train(tiny_cfg(out=str(split), resume=str(split / "checkpoints/step-000003"), **common),
                    say=lambda *_: None)
    name = "adapter_model.safetensors" if common["method"] != "full" else "model.safetensors"
    a, b = (load_file(f"{s['checkpoint']}/adapter/{name}") for s in (whole, resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed["eval_loss"] == whole["eval_loss"] and whole["eval_loss"] < whole["eval_loss_start"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_muon_resumes_exactly_through_the_recipe(tiny_cfg, tmp_path, method):
    _resume_equals_uninterrupted(tiny_cfg, tmp_path, method=method, optimizer="muon")


@pytest.mark.parametrize("args, message", [
    ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
    ({"nesterov": "maybe"}, "nesterov must be true or false"),
    ({"ns_steps": 0}, r"ns_steps must be an integer in \[1, 99\]"),
    ({"ns_steps": 100}, r"ns_steps must be an integer in \[1, 99\]"),
    ({"eps": 0}, "eps must be a number > 0"),
    ({"rank": 4}, "does not take optimizer_args"),
])
def test_muon_refuses_bad_options_in_one_line_before_loading(tiny_cfg, monkeypatch, args, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ConfigError, match=message) as refused:
        validate(tiny_cfg(method="full", optimizer="muon", **{f"optimizer_args.{k}": v for k, v in args.items()}))
    assert "\n" not in str(refused.value)


# ---- apollo ------------------------------------------------------------------------------------
def test_apollo_groups_follow_the_readme_and_the_rest_is_plain_adam():
    model = tiny_llama(300)
    opt = get_optimizer("apollo").build(model, OptimizerSpec(lr=1e-3, rank=4, options=ApolloOptions()))
    assert isinstance(opt, apollo_adamw_class())
    low, rest = opt.param_groups
    assert {k: low[k] for k in ("rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type")} == {
        "rank": 4, "proj": "random", "scale_type": "channel", "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
    assert "rank" not in rest and "model.embed_tokens.weight" in {
        n for n, p in model.named_parameters() if any(p is q for q in rest["params"])}
    # same groups handed to the package by hand: the same steps
    twin = copy.deepcopy(model)
    twins = dict(twin.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**g, "params": [twins[names[id(p)]] for p in g["params"]]} for g in (low, rest)]
    by_hand = apollo_adamw_class()(groups, lr=1e-3)
    for step in range(3):
        _grads(model, torch.Generator().manual_seed(step))
        _grads(twin, torch.Generator().manual_seed(step))
        opt.step()
        by_hand.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, twins[name], rtol=0, atol=0, msg=name)
    projector = opt.state[low["params"][0]]["projector"]
    assert type(projector).__name__ == "GradientProjector" and projector.ortho_matrix.shape[0] == 4


def test_apollo_rest_frozen_keeps_state_for_the_matrices_only():
    model = tiny_llama(300)
    opt = get_optimizer("apollo").build(model, OptimizerSpec(rank=2, options=ApolloOptions(rest="frozen")))
    assert not opt.param_groups[1]["params"] and not model.lm_head.weight.requires_grad


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_apollo_resumes_exactly_and_its_projectors_load_without_unpickling_code(tiny_cfg, tmp_path, proj):
    # gap 2: the projector is redrawn at the resumed step, from the seed the checkpoint kept
    _resume_equals_uninterrupted(tiny_cfg, tmp_path, method="full", optimizer="apollo", lr=1e-3,
                                 **{"optimizer_args.update_proj_gap": 2, "optimizer_args.proj": proj})
    state_file = tmp_path / "split/checkpoints/step-000003/state.pt"
    with pytest.raises(pickle.UnpicklingError):  # the allow-list is what lets the projector in
        torch.load(state_file, weights_only=True)
    state = ckpt.load_state(state_file)
    kinds = {type(s["projector"]).__name__ for s in state["optimizer"]["state"].values() if "projector" in s}
    assert kinds == {"GradientProjector" if proj == "random" else "GaLoreProjector"}


@pytest.mark.parametrize("args, message", [
    ({"scale_type": "row"}, "scale_type must be one of channel, tensor"),
    ({"proj": "qr"}, "proj must be one of random, svd"),
    ({"proj_type": "full"}, "proj_type must be one of"),
    ({"update_proj_gap": 0}, "update_proj_gap must be an integer >= 1"),
    ({"scale": -1}, "scale must be a number > 0"),
    ({"rest": "sgd"}, "rest must be one of adamw, frozen"),
])
def test_apollo_refuses_bad_options_in_one_line_before_loading(tiny_cfg, monkeypatch, args, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(method="full", optimizer="apollo", **{f"optimizer_args.{k}": v for k, v in args.items()}))
    with pytest.raises(ConfigError, match="optimizer 'apollo' needs the full weights: use method=.*full"):
        validate(tiny_cfg(method="lora", optimizer="apollo"))


def test_apollo_without_its_package_is_one_line(tiny_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "apollo_torch" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^optimizer 'apollo' needs the apollo-torch package: pip install "
                                          r"--no-deps apollo-torch$"):
        validate(tiny_cfg(method="full", optimizer="apollo"))


# ---- the bench -----------------------------------------------------------------------------------
def test_bench_runs_muon_and_apollo_at_tiny_scale(tmp_path):
    from rankwise.bench.optimizers import main

    out = tmp_path / "pre.json"
    assert main(["--scale", "tiny", "--optimizers", "muon,apollo", "--steps", "2", "--workdir", str(tmp_path / "w"),
                 "--out", str(out), "--lrs", "muon=3e-3;apollo=3e-3"]) == 0
    runs = {r["optimizer"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["muon", "apollo"] and runs["apollo"]["rank"] == 16
    assert runs["apollo"]["matrix_state_bytes"] < runs["muon"]["matrix_state_bytes"]  # rank-16 vs full momentum
    out = tmp_path / "ft.json"
    assert main(["--finetune", "--scale", "tiny", "--steps", "2", "--optimizers", "lora,lora-muon,apollo",
                 "--workdir", str(tmp_path / "w"), "--out", str(out),
                 "--lrs", "lora=3e-3;lora-muon=3e-3;apollo=1e-3"]) == 0
    by = {r["label"]: r for r in json.loads(out.read_text())["runs"]}
    assert (by["lora-muon"]["method"], by["lora-muon"]["optimizer"]) == ("lora", "muon")
    assert by["lora-muon"]["optimizer_state_bytes"] < 0.6 * by["lora"]["optimizer_state_bytes"]  # one moment
    assert by["apollo"]["trainable_params"] > by["lora"]["trainable_params"]  # APOLLO steps the full weights
    assert all(r["eval_loss"] < r["eval_loss_start"] for r in by.values())
