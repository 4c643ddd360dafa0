"""FFBA: training, the artifact, fused == unfused (logits and cached generation), refusals, budget."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rankwise.config import ConfigError
from rankwise.ffba import FusedAttention, FusedMLP, Parallel, Settings, adapters, fuse, inject
from rankwise.generate import load_for_inference
from rankwise.methods import get_method
from rankwise.recipes.train import train
from rankwise.validate import validate

from _ffba_checks import fused_matches_and_resaves, relative

QUIET = {"say": lambda *_: None}


def _tiny(arch: str = "llama", seed: int = 0):
    """A tiny random model of a supported family (qwen2 adds q/k/v biases, mistral a sliding window)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = kinds[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return model_cls(config).eval()


def _trained_like(model, settings: Settings, seed: int = 1):
    """Inject adapters and give B non-zero values, as training would (B starts at zero)."""
    model = inject(model, settings)
    gen = torch.Generator().manual_seed(seed)
    for adapter in adapters(model).values():
        adapter.B.data = torch.randn(adapter.B.shape, generator=gen) * 0.2
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_fused_equals_unfused_logits(arch, activation):
    base = _tiny(arch)
    ids = torch.randint(5, 300, (3, 24))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        unfused_model = _trained_like(copy.deepcopy(base), Settings(rank=6, alpha=12, activation=activation))
        unfused = unfused_model(input_ids=ids).logits
        fused_model = fuse(copy.deepcopy(unfused_model))
        fused = fused_model(input_ids=ids).logits
    assert relative(unfused, plain) > 1e-2  # the adapter really changes the output
    assert relative(fused, unfused) <= 1e-5
    layer = fused_model.model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    # one GEMM per fused projection: the attention's q/k/v/A rows live in a single weight
    assert layer.self_attn.qkvz.weight.shape[0] == sum(layer.self_attn.splits)


def test_fused_with_padding_matches_unfused():
    base = _tiny()
    ids = torch.randint(5, 300, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    unfused_model = _trained_like(copy.deepcopy(base), Settings(rank=4, alpha=8, blocks=("mlp", "attn")))
    fused_model = fuse(copy.deepcopy(unfused_model))
    with torch.no_grad():
        a = unfused_model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        b = fused_model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert relative(b, a) <= 1e-5


@pytest.mark.parametrize("blocks", [("attn",), ("mlp",)])
def test_one_sub_block_only(blocks):
    base = _tiny()
    model = _trained_like(copy.deepcopy(base), Settings(rank=4, alpha=8, blocks=blocks))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn, Parallel) == ("attn" in blocks)
    assert isinstance(layer.mlp, Parallel) == ("mlp" in blocks)
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        assert relative(fuse(copy.deepcopy(model))(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5


def test_fused_generates_like_unfused_with_cache():
    base = _tiny()
    unfused_model = _trained_like(copy.deepcopy(base), Settings(rank=4, alpha=8, activation="relu"), seed=3)
    fused_model = fuse(copy.deepcopy(unfused_model))
    ids = torch.randint(5, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
    a = unfused_model.generate(input_ids=ids, **kwargs)
    b = fused_model.generate(input_ids=ids, **kwargs)
    plain = base.generate(input_ids=ids, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)  # the adapter changed what is generated


@pytest.mark.parametrize("blocks", [["attn", "mlp"], ["mlp"], ["attn"]])
def test_trainable_parameters_are_two_d_r_per_sub_block(tiny_cfg, blocks):
    cfg = tiny_cfg(method="ffba", rank=5, **{"method_args.blocks": "[" + ",".join(blocks) + "]"})
    base = AutoModelForCausalLM.from_pretrained(cfg.model)
    model = get_method("ffba").apply(base, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    d, n_layers = base.config.hidden_size, base.config.num_hidden_layers
    assert sum(p.numel() for p in trainable) == 2 * d * 5 * len(blocks) * n_layers
    assert all(p.shape in ((5, d), (d, 5)) for p in trainable)  # only A (r×d) and B (d×r) train
    assert all(float(a.B.detach().abs().max()) == 0.0 for a in adapters(model).values())  # starts at the base model


def test_training_learns_and_artifact_round_trips(tiny_cfg, tiny_model_dir, tmp_path):
    cfg = tiny_cfg(method="ffba", rank=8, alpha=16, steps=12, lr=1e-2, schedule="constant",
                   **{"method_args.activation": "silu"})
    summary = train(cfg, **QUIET)
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.05
    adapter_dir = f"{summary['checkpoint']}/adapter"
    config = json.loads(open(f"{adapter_dir}/ffba_config.json").read())
    assert config["rank"] == 8 and config["activation"] == "silu" and config["blocks"] == ["attn", "mlp"]

    method = get_method("ffba")
    ids = torch.randint(5, 300, (2, 19))
    unfused = method.load(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir, trainable=True)
    assert isinstance(unfused.model.layers[0].self_attn, Parallel)
    assert all(float(a.B.detach().abs().max()) > 0 for a in adapters(unfused).values())  # trained, not zero
    assert all(p.requires_grad for a in adapters(unfused).values() for p in a.parameters())
    # what `rankwise generate --adapter RUN` loads: the fused form
    fused, _ = load_for_inference(None, cfg.out)
    assert isinstance(fused.model.layers[0].self_attn, FusedAttention)
    assert not any(p.requires_grad for p in fused.parameters())
    # fused == unfused; saved again from the reloaded model, the same tensors come back
    fused_matches_and_resaves(method, unfused, fused, ids, tiny_model_dir, tmp_path / "resaved")


def test_resume_continues_ffba_training(tiny_cfg):
    cfg = tiny_cfg(method="ffba", steps=4, save_every=2)
    train(cfg, **QUIET)
    resumed = train(tiny_cfg(method="ffba", steps=6, resume="latest", out=cfg.out), **QUIET)
    assert resumed["step"] == 6


def test_unsupported_architecture_is_refused(tiny_cfg, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(gpt2_dir)
    with pytest.raises(ConfigError, match="supported: LlamaForCausalLM") as err:
        validate(tiny_cfg(method="ffba", model=str(gpt2_dir)))
    assert "gpt2" in str(err.value) and len(str(err.value).splitlines()) == 1
    # and at apply time, for a model that arrives without a config check
    with pytest.raises(ConfigError, match="supported: LlamaForCausalLM"):
        inject(GPT2LMHeadModel.from_pretrained(gpt2_dir), Settings(rank=2, alpha=4))


@pytest.mark.parametrize("overrides, message", [
    ({"rank": 0}, "rank must be a positive"),
    ({"method_args.activation": "tanh"}, "unknown method_args.activation"),
    ({"method_args.blocks": "[attn,ffn]"}, "subset of"),
    ({"method_args.layers": 3}, "does not take method_args"),
    ({"target_modules": "[q_proj]"}, "method_args.blocks"),
])
def test_bad_options_are_refused(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(method="ffba", **overrides))


def test_merge_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="cannot be merged"):
        get_method("ffba").merge(_tiny())


def test_latency_bench_compares_equal_budgets(monkeypatch):
    import rankwise.bench.latency as latency
    from rankwise.bench.latency import build_variants, ffba_rank_for, measure

    base = _tiny()
    rank = ffba_rank_for(base, lora_rank=4)
    models, budgets = build_variants(base, lora_rank=4, ffba_rank=rank, activation="identity")
    assert budgets["lora unmerged"] == budgets["ffba fused"] == 2 * 64 * rank * 2 * 2  # exact for these shapes
    # the bench's clock advances only by model calls, variant i's costing i + 1 s each: the prompt is one
    # call and each new token after the first one more, so the timings must come out as exactly i + 1 s
    clock = [0.0]
    monkeypatch.setattr(latency, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    for i, model in enumerate(models.values()):
        model.register_forward_pre_hook(lambda *_, cost=i + 1.0: clock.__setitem__(0, clock[0] + cost))
    ids = torch.randint(5, 300, (2, 8))
    result = measure(models, {2: ids}, new_tokens=4, repeats=2)
    assert result["ffba_fused_tokens_equal_unfused"]
    for i, name in enumerate(models):
        timing = result["timings"][name][2]
        assert timing["prefill_s"] == timing["decode_s_per_token"] == i + 1.0
        assert timing["prefill_all"] == [i + 1.0] * 2  # the warm-up run is discarded
    with torch.no_grad():  # merged and unmerged LoRA are the same function, so the comparison is fair
        merged, unmerged = models["lora merged"](input_ids=ids).logits, models["lora unmerged"](input_ids=ids).logits
    assert relative(merged, unmerged) <= 1e-5


def test_fused_follows_the_configured_attention_function():
    base = _tiny()
    base.set_attn_implementation("eager")
    unfused_model = _trained_like(copy.deepcopy(base), Settings(rank=4, alpha=8))
    fused_model = fuse(copy.deepcopy(unfused_model))
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        out = fused_model(input_ids=ids, output_attentions=True)
        assert relative(out.logits, unfused_model(input_ids=ids).logits) <= 1e-5
    assert fused_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("args", [["--lr", "abc"], ["--lr", "0"], ["--methods", "lora,xx"], ["--methods", ""],
                                  ["--ffba-blocks", "mlp,ffn"], ["--ffba-blocks", "attn+attn"], ["--ffba-blocks", ","],
                                  ["--ffba-scales", "0"], ["--ffba-scales", "big"], ["--lora-scales", "-1"],
                                  ["--seeds", "1,1"], ["--seeds", "-1"], ["--seeds", "x"], ["--seeds", ","],
                                  ["--task-examples", "-1"], ["--ffba-adapters", "sideways"],
                                  ["--ffba-adapters", "both,both"], ["--ffba-splits", "1"], ["--ffba-splits", "0"],
                                  ["--lora-targets", "q+x"], ["--lora-targets", "q+q"],
                                  ["--validation-examples", "-1"], ["--lora-inits", "pisa"],
                                  ["--lora-inits", "eva"], ["--lora-inits", "pissa,pissa"]])
def test_quality_bench_refuses_bad_sweeps_before_loading(args, capsys):
    from rankwise.bench.latency import main

    with pytest.raises(SystemExit) as stop:
        main(["--quality", *args])
    assert stop.value.code == 2 and "error: --" in capsys.readouterr().err


def test_quality_table_compares_each_best_with_loras_best():
    from rankwise.bench.latency import _quality_table

    sweep = lambda *losses: {f"{lr:g}": {"eval_loss": l} for lr, l in zip((1e-3, 2e-3), losses)}  # noqa: E731
    results = {"lora": {"rank": 12, "sweep": sweep(2.60, 2.58), "best_lr": 2e-3, "eval_loss": 2.58},
               "ffba (identity)": {"rank": 53, "sweep": sweep(2.57, 2.61), "best_lr": 1e-3, "eval_loss": 2.57}}
    table = _quality_table(results)
    assert "ffba (identity): -0.0100 vs LoRA's best, every scale (no worse than LoRA: met)" in table
    assert "ROUGE-L" not in table  # no task metric measured: no column
    results["lora"]["rouge_l"], results["ffba (identity)"]["rouge_l"] = 0.25, 0.3125
    table = _quality_table(results)
    assert "ROUGE-L" in table and "2.5700   0.3125  (0.001: 2.5700" in table  # beside its held-out loss
    results["ffba (identity)"]["eval_loss"] = 2.59
    assert "MISSED" in _quality_table(results)
    results["ffba (identity)"]["eval_loss"] = 2.57  # beats LoRA at s = 2, not LoRA at its better scale
    results["lora s=8"] = {"rank": 12, "sweep": sweep(2.56, 2.59), "best_lr": 1e-3, "eval_loss": 2.56}
    assert "ffba (identity): +0.0100 vs LoRA's best, every scale (worse than LoRA: MISSED)" in _quality_table(results)


def test_quality_bench_trains_each_ffba_placement_at_its_own_equal_budget_rank(tmp_path, capsys):
    from rankwise.bench.latency import main

    out = tmp_path / "q.json"
    assert main(["--scale", "tiny", "--quality", "--methods", "ffba,lora", "--activations", "identity", "--steps", "1",
                 "--batch-size", "2", "--eval-examples", "2", "--ffba-blocks", "attn+mlp,mlp", "--ffba-scales", "1,2",
                 "--lora-scales", "2,8", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    both, mlp = record["ffba_ranks"]["attn+mlp"], record["ffba_ranks"]["mlp"]
    assert abs(mlp - 2 * both) <= 1  # one sub-block per layer: twice the rank for the same budget
    runs = record["quality"]
    assert set(runs) == {"ffba (identity)", "ffba s=1 (identity)", "ffba mlp (identity)", "ffba mlp s=1 (identity)",
                         "lora", "lora s=8"}
    assert runs["lora s=8"]["alpha"] == 4 * runs["lora"]["alpha"] == 8 * record["lora_rank"]
    assert runs["ffba mlp (identity)"]["rank"] == runs["ffba mlp s=1 (identity)"]["rank"] == mlp
    assert runs["ffba s=1 (identity)"]["alpha"] == both and runs["ffba (identity)"]["alpha"] == 2 * both
    assert all(r["eval_loss"] < r["eval_loss_start"] for r in record["quality"].values())


def test_quality_bench_reports_the_mean_over_seeds_and_each_seed(tmp_path):
    from rankwise.bench.latency import main

    out = tmp_path / "q.json"
    assert main(["--scale", "tiny", "--quality", "--methods", "lora", "--steps", "2", "--batch-size", "2",
                 "--eval-examples", "2", "--lr", "1e-2", "--seeds", "0,3", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    point = record["quality"]["lora"]["sweep"]["0.01"]
    assert record["seeds"] == [0, 3] and set(point["seeds"]) == {"0", "3"}
    assert point["seeds"]["0"] != point["seeds"]["3"]  # another initialisation and data order: another loss
    assert point["eval_loss"] == pytest.approx((point["seeds"]["0"] + point["seeds"]["3"]) / 2)
    assert record["quality"]["lora"]["eval_loss"] == point["eval_loss"]
    assert record["task_examples"] == 2 and set(point["rouge_l_seeds"]) == {"0", "3"}  # the tiny scale's default
    assert point["rouge_l"] == pytest.approx(sum(point["rouge_l_seeds"].values()) / 2)
    assert 0 <= point["rouge_l"] <= 1 and record["quality"]["lora"]["rouge_l"] == point["rouge_l"]
