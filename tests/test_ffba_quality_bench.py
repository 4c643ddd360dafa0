"""The FFBA benches around the backward adapter (issue 22): equal budgets for every adapter kind and LoRA
target set, lr chosen on the validation split and test loss reported, the latency bench timing backward
adapters, and the bf16 agreement bench."""
import json
import subprocess
import sys

import pytest
import torch

from rankwise.bench.latency_quality import lora_params_per_rank, quality, quality_arms
from rankwise.ffba import Settings, inject
from rankwise.ffba.inject import parameter_count, rank_for_budget
from rankwise.tiny import tiny_llama


@pytest.mark.parametrize("kind, split, reads", [("forward", None, "hidden"), ("backward", None, "hidden"),
                                               ("both", None, "hidden"), ("both", 0.25, "hidden"),
                                               ("backward", None, "normed"), ("both", 0.25, "normed")])
def test_rank_for_budget_is_the_closest_rank(kind, split, reads):
    model = tiny_llama(300)
    budget = 4 * lora_params_per_rank(model)
    settings = {"adapters": kind, "reads": reads} | ({"split": split} if split else {})
    r = rank_for_budget(model, budget, **settings)
    miss = lambda rank: abs(parameter_count(model, Settings(rank=rank, alpha=1.0, **settings)) - budget)  # noqa: E731
    assert miss(r) <= min(miss(r - 1), miss(r + 1))
    built = inject(tiny_llama(300), Settings(rank=r, alpha=2.0 * r, **settings).check())
    assert sum(p.numel() for p in built.parameters() if p.requires_grad) == parameter_count(model, Settings(
        rank=r, alpha=1.0, **settings))


def test_quality_arms_give_every_setting_all_linear_loras_budget():
    model = tiny_llama(300)
    arms = quality_arms(model, 4, ["lora", "ffba"], ["all-linear", "q+k+v+gate+up", "o+down"], [2.0, 8.0],
                        ["attn+mlp"], ["identity"], [32.0], ["forward", "backward", "both"], [0.25, 0.5])
    assert set(arms) == {"lora", "lora s=8", "lora q+k+v+gate+up", "lora q+k+v+gate+up s=8", "lora o+down",
                         "lora o+down s=8", "ffba s=32 (identity)", "ffba backward s=32 (identity)",
                         "ffba both 0.25 s=32 (identity)", "ffba both s=32 (identity)"}
    budget = 4 * lora_params_per_rank(model)
    for targets, modules in (("q+k+v+gate+up", ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
                             ("o+down", ["o_proj", "down_proj"])):
        arm = arms[f"lora {targets} s=8"]
        assert arm["target_modules"] == modules and arm["alpha"] == 8 * arm["rank"]
        per_rank = lora_params_per_rank(model, targets)
        assert abs(arm["rank"] * per_rank - budget) <= per_rank / 2  # the closest rank to the same budget
    assert "target_modules" not in arms["lora"]  # all-linear: the recipe's default
    both = arms["ffba both 0.25 s=32 (identity)"]
    assert both["method_args.adapters"] == "both" and both["method_args.split"] == 0.25
    assert both["rank"] == rank_for_budget(model, budget, adapters="both", split=0.25)
    assert "method_args.split" not in arms["ffba backward s=32 (identity)"]
    normed = quality_arms(model, 4, ["ffba"], [], [], ["attn+mlp"], ["identity"], [8.0], ["forward", "backward"],
                          [0.5], ffba_reads=("hidden", "normed"))
    assert set(normed) == {"ffba s=8 (identity)", "ffba backward s=8 (identity)", "ffba backward normed s=8 (identity)"}
    arm = normed["ffba backward normed s=8 (identity)"]
    assert arm["method_args.reads"] == "normed" and "method_args.reads" not in normed["ffba backward s=8 (identity)"]
    assert arm["rank"] == rank_for_budget(model, budget, adapters="backward", reads="normed")
    assert arm["rank"] != normed["ffba backward s=8 (identity)"]["rank"]  # A reads d, not the MLP's width
    inits = quality_arms(model, 4, ["lora"], ["all-linear"], [8.0], [], [], [], [], [], ("default", "pissa"))
    assert set(inits) == {"lora s=8", "lora pissa s=8"}
    assert inits["lora pissa s=8"]["method_args.init_lora_weights"] == "pissa"
    assert "method_args.init_lora_weights" not in inits["lora s=8"]


def test_lr_is_chosen_on_validation_and_test_loss_is_reported(monkeypatch, tmp_path):
    """Validation and test disagree on purpose: the chosen lr must follow validation, the number reported must
    be the test loss at that lr (choosing on test would report 2.0 at lr 0.02)."""
    import rankwise.recipes.train as recipe

    losses = {0.01: (2.5, 1.0), 0.02: (2.0, 3.0)}  # lr -> (test, validation)
    seen = []

    def fake_train(cfg, say):
        seen.append(cfg)
        test, val = losses[cfg.lr]
        return {"eval_loss": test + cfg.seed / 100, "eval_loss_start": 4.0, "validation_loss": val + cfg.seed / 100,
                "rouge_l": None, "cum_seconds": 1.0}

    monkeypatch.setattr(recipe, "train", fake_train)
    arms = {"lora": {"method": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"}}
    out = quality("default", arms, 3, [0.01, 0.02], tmp_path, False, 2, 4, "fp32", seeds=(0, 2),
                  validation_examples=8)
    row = out["lora"]
    assert row["best_lr"] == 0.01 and row["chosen_by"] == "validation_loss"
    assert row["eval_loss"] == pytest.approx(2.51) and row["validation_loss"] == pytest.approx(1.01)
    assert all(c.validation_examples == 8 and c.method == "lora" for c in seen) and len(seen) == 4
    out = quality("default", arms, 3, [0.01, 0.02], tmp_path, False, 2, 4, "fp32", validation_examples=0)
    assert out["lora"]["best_lr"] == 0.02 and out["lora"]["chosen_by"] == "eval_loss"  # no validation: test


def test_a_diverged_run_is_never_chosen_and_the_sweep_goes_on(monkeypatch, tmp_path):
    import rankwise.recipes.train as recipe

    def fake_train(cfg, say):
        if cfg.lr > 0.015:
            raise recipe.TrainingDiverged("loss became nan at step 3; stopping (no checkpoint was saved yet)")
        return {"eval_loss": 2.5, "eval_loss_start": 4.0, "validation_loss": 2.4, "rouge_l": None, "cum_seconds": 1.0}

    monkeypatch.setattr(recipe, "train", fake_train)
    saved = []
    arms = {"lora": {"method": "lora", "rank": 4, "alpha": 8}, "dora": {"method": "dora", "rank": 4, "alpha": 8}}
    out = quality("default", arms, 3, [0.02, 0.01], tmp_path, False, 2, 4, "fp32", validation_examples=8,
                  progress=lambda rows: saved.append(list(rows)))
    assert out["lora"]["best_lr"] == 0.01 and out["lora"]["eval_loss"] == 2.5
    assert out["lora"]["sweep"]["0.02"]["eval_loss"] == float("inf")
    assert out["lora"]["sweep"]["0.02"]["diverged"] == {"0": "loss became nan at step 3"}
    assert saved == [["lora"], ["lora", "dora"]]  # what a stopped sweep would have kept


@pytest.mark.parametrize("reads", ["hidden", "normed"])
def test_latency_bench_times_the_adapter_kind_it_was_asked_for(reads):
    from rankwise.bench.latency import build_variants

    base = tiny_llama(300)
    rank = rank_for_budget(base, 4 * lora_params_per_rank(base), adapters="both", reads=reads)
    models, budgets = build_variants(base, 4, rank, "identity", "both", reads)
    assert budgets["ffba fused"] == parameter_count(base, Settings(rank=rank, alpha=1.0, adapters="both", reads=reads))
    assert models["ffba fused"].model.layers[1].self_attn.writes_from == ("input" if reads == "normed" else "output")
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        fused, unfused = models["ffba fused"](input_ids=ids).logits, models["ffba unfused"](input_ids=ids).logits
        moved = (unfused - models["base"](input_ids=ids).logits).abs().max()
    assert float(moved) > 1e-3  # the backward adapters' up-projections are non-zero too
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_ffba_agreement_bench_matches_effects_and_reports_each_pair(tmp_path):
    out = tmp_path / "agree.json"
    done = subprocess.run([sys.executable, "-m", "rankwise.cli", "bench", "ffba-agreement", "--scale", "tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    lora = results.pop("lora merged vs unmerged")
    assert [name.split(" r=")[0] for name in results] == ["ffba forward", "ffba backward", "ffba both"]
    for row in [lora, *results.values()]:
        assert 0 < row["max_abs_logit_diff"] and row["mean_abs_logit_diff"] <= row["max_abs_logit_diff"]
        assert 0 <= row["greedy_token_agreement"] <= 1 and 0 <= row["forced_argmax_agreement"] <= 1
    for row in results.values():  # each FFBA kind moves the model as far as LoRA does, at LoRA's budget
        assert row["effect_vs_base"] == pytest.approx(lora["effect_vs_base"], rel=0.02)
        assert abs(row["budget"] - lora["budget"]) / lora["budget"] < 0.1
