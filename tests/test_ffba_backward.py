"""FFBA backward (cross-junction) adapters and adapters=both, reading the hidden h or the normed x: fused ==
unfused (logits, cached and uncached generation), the artifact (v3 round trip, v1 and v2 still load), the
budget formula, training, refusals."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rankwise.config import ConfigError
from rankwise.ffba import io
from rankwise.ffba import (Emit, FusedAttention, FusedMLP, Parallel, Receive, Settings, adapters, fuse, inject,
                           junctions, parameter_count)
from rankwise.generate import load_for_inference
from rankwise.methods import get_method
from rankwise.recipes.train import train
from rankwise.validate import validate

from _ffba_checks import fused_matches_and_resaves, relative

QUIET = {"say": lambda *_: None}


def _tiny(arch: str = "llama", layers: int = 3, seed: int = 0):
    """A tiny random model (qwen2: q/k/v biases; mistral: a sliding window); 3 layers, so a middle layer both
    receives from the one before and writes to the one after."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = kinds[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return model_cls(config).eval()


def _trained_like(model, settings: Settings, seed: int = 1, size: float = 0.2):
    """Inject adapters and give every B non-zero values, as training would (B starts at zero)."""
    model = inject(model, settings)
    gen = torch.Generator().manual_seed(seed)
    for adapter in adapters(model).values():
        adapter.B.data = torch.randn(adapter.B.shape, generator=gen) * size
    for junction in junctions(model).values():
        junction.set_B(torch.randn(junction.B.shape, generator=gen) * size)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("variant, activation, reads", [
    ("backward", "identity", "hidden"), ("both", "identity", "hidden"), ("both", "silu", "hidden"),
    ("backward", "identity", "normed"), ("both", "silu", "normed")])
def test_fused_equals_unfused_logits(arch, variant, activation, reads):
    base = _tiny(arch)
    ids = torch.randint(5, 300, (3, 20))
    settings = Settings(rank=6, alpha=12, adapters=variant, activation=activation, reads=reads).check()
    unfused_model = _trained_like(copy.deepcopy(base), settings)
    fused_model = fuse(copy.deepcopy(unfused_model))
    with torch.no_grad():
        plain, unfused, fused = (m(input_ids=ids).logits for m in (base, unfused_model, fused_model))
    assert relative(unfused, plain) > 1e-2  # the adapters really change the output
    assert relative(fused, unfused) <= 1e-5
    assert not any(isinstance(m, (Emit, Receive, Parallel)) for m in fused_model.modules())
    first, middle = fused_model.model.layers[0], fused_model.model.layers[1]
    assert isinstance(middle.self_attn, FusedAttention) and isinstance(middle.mlp, FusedMLP)
    # z comes in as extra input columns of the one q/k/v(/A) GEMM and leaves as extra output rows of o_proj
    # (reads=hidden) or of that same q/k/v GEMM (reads=normed)
    r_bwd, r_fwd = settings.backward_rank, settings.forward_rank
    assert middle.self_attn.qkvz.in_features == 64 + r_bwd and first.self_attn.qkvz.in_features == 64
    qkv = 64 + 2 * 32  # 2 of 4 heads for k and v
    assert middle.self_attn.qkvz.out_features == qkv + r_fwd + (r_bwd if reads == "normed" else 0)
    assert middle.self_attn.o_proj.out_features == 64 + (r_bwd if reads == "hidden" else 0)
    assert middle.self_attn.o_proj.in_features == 64 + (r_fwd if variant == "both" else 0)


@pytest.mark.parametrize("reads", ["hidden", "normed"])
def test_backward_adapter_only_touches_the_next_blocks_inputs(reads):
    """B·z is added to the next sub-block's input projections, never to the residual: with only the
    attention→MLP junction of layer 0 non-zero, layer 0's attention output is unchanged, its MLP's is not."""
    base = _tiny()
    model = inject(copy.deepcopy(base), Settings(rank=4, alpha=8, adapters="backward", reads=reads))
    junctions(model)["layers.0.attn"].set_B(torch.ones_like(junctions(model)["layers.0.attn"].B))
    seen, ids = {}, torch.randint(5, 300, (1, 8))
    for name, net in (("base", base), ("adapted", model)):
        layer = net.model.layers[0]
        layer.self_attn.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__((n, "attn"), o[0]))
        layer.mlp.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__((n, "mlp"), o))
        with torch.no_grad():
            net(input_ids=ids)
    assert torch.equal(seen["base", "attn"], seen["adapted", "attn"])
    assert not torch.allclose(seen["base", "mlp"], seen["adapted", "mlp"])


@pytest.mark.parametrize("variant, reads", [("backward", "hidden"), ("both", "hidden"), ("backward", "normed"),
                                           ("both", "normed")])
def test_cached_generation_equals_uncached_and_unfused(variant, reads):
    base = _tiny()
    unfused_model = _trained_like(copy.deepcopy(base), Settings(rank=4, alpha=8, adapters=variant, reads=reads),
                                  seed=3, size=0.5)
    fused_model = fuse(copy.deepcopy(unfused_model))
    ids = torch.randint(5, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    fused_cached = fused_model.generate(input_ids=ids, use_cache=True, **kwargs)
    assert torch.equal(fused_cached, fused_model.generate(input_ids=ids, use_cache=False, **kwargs))
    assert torch.equal(fused_cached, unfused_model.generate(input_ids=ids, use_cache=True, **kwargs))
    assert torch.equal(fused_cached, unfused_model.generate(input_ids=ids, use_cache=False, **kwargs))
    assert not torch.equal(fused_cached, base.generate(input_ids=ids, use_cache=True, **kwargs))


@pytest.mark.parametrize("variant, blocks, reads", [
    ("backward", ("attn", "mlp"), "hidden"), ("both", ("attn", "mlp"), "hidden"), ("backward", ("mlp",), "hidden"),
    ("both", ("attn",), "hidden"), ("backward", ("attn", "mlp"), "normed"), ("both", ("mlp",), "normed")])
def test_trainable_parameters_follow_the_formula(variant, blocks, reads):
    base = _tiny(layers=3)
    settings = Settings(rank=7, alpha=7, adapters=variant, blocks=blocks, split=0.6 if variant == "both" else None,
                        reads=reads)
    model = inject(copy.deepcopy(base), settings.check())
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, ff, qkv, layers = 64, 96, 64 + 2 * 32, 3  # 2 of 4 heads for k and v
    r_bwd = 4 if variant == "both" else 7  # round(0.6 · 7)
    r_fwd = 7 - r_bwd
    forward = 2 * d * r_fwd * len(blocks) * layers
    # A reads o_proj's input (d) or down_proj's (ff), or with reads=normed the normed x (d); B feeds gate+up or q,k,v
    after_attn = r_bwd * (d + 2 * ff) * layers if "attn" in blocks else 0
    after_mlp = r_bwd * ((ff if reads == "hidden" else d) + qkv) * (layers - 1) if "mlp" in blocks else 0
    assert n == forward + after_attn + after_mlp == parameter_count(base, settings)
    expected = {f"layers.{i}.{b}" for i in range(layers) for b in blocks if (i, b) != (layers - 1, "mlp")}
    assert set(junctions(model)) == expected
    assert all(float(p.detach().abs().max()) == 0.0 for j in junctions(model).values() for p in j.parameters()[1:])
    with torch.no_grad():  # B = 0: exactly the base model
        ids = torch.randint(5, 300, (1, 9))
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("variant, reads", [("backward", "hidden"), ("both", "hidden"), ("backward", "normed")])
def test_training_learns_and_artifact_round_trips(tiny_cfg, tiny_model_dir, tmp_path, variant, reads):
    cfg = tiny_cfg(method="ffba", rank=8, alpha=16, steps=12, lr=1e-2, schedule="constant",
                   **{"method_args.adapters": variant, "method_args.reads": reads})
    summary = train(cfg, **QUIET)
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.05
    adapter_dir = f"{summary['checkpoint']}/adapter"
    config = json.loads(open(f"{adapter_dir}/ffba_config.json").read())
    assert config["version"] == 3 and config["adapters"] == variant and config["reads"] == reads
    assert config["split"] == (0.5 if variant == "both" else None)

    method = get_method("ffba")
    ids = torch.randint(5, 300, (2, 19))
    unfused = method.load(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir, trainable=True)
    trained = [p for j in junctions(unfused).values() for p in j.parameters()]
    assert trained and all(p.requires_grad for p in trained)
    assert all(float(j.B.abs().max()) > 0 for j in junctions(unfused).values())  # trained, not zero
    fused, _ = load_for_inference(None, cfg.out)  # what `rankwise generate --adapter RUN` loads
    assert isinstance(fused.model.layers[0].mlp, FusedMLP) and fused.model.layers[0].mlp.reads == "layers.0.attn"
    assert not any(p.requires_grad for p in fused.parameters())
    fused_matches_and_resaves(method, unfused, fused, ids, tiny_model_dir, tmp_path / "resaved")


def test_version_1_artifact_still_loads(tiny_model_dir, tmp_path):
    """An artifact written before backward adapters existed (version 1, no `adapters` key) is forward-only."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = _trained_like(copy.deepcopy(base), Settings(rank=4, alpha=8))
    io.save(model, Settings(rank=4, alpha=8), tmp_path)
    raw = json.loads((tmp_path / "ffba_config.json").read_text())
    for key in ("adapters", "split", "forward_rank", "backward_rank"):
        del raw[key]
    (tmp_path / "ffba_config.json").write_text(json.dumps({**raw, "version": 1}))
    loaded = get_method("ffba").load(copy.deepcopy(base), tmp_path, trainable=False)
    ids = torch.randint(5, 300, (2, 11))
    with torch.no_grad():
        assert relative(loaded(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5
    assert loaded.ffba_settings.adapters == "forward"


def test_version_2_artifact_loads_as_reads_hidden(tiny_model_dir, tmp_path):
    """An artifact written before `reads` existed (version 2) has backward adapters that read the hidden h."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    settings = Settings(rank=4, alpha=8, adapters="backward")
    model = _trained_like(copy.deepcopy(base), settings)
    io.save(model, settings, tmp_path)
    raw = json.loads((tmp_path / "ffba_config.json").read_text())
    del raw["reads"]
    (tmp_path / "ffba_config.json").write_text(json.dumps({**raw, "version": 2}))
    loaded = get_method("ffba").load(copy.deepcopy(base), tmp_path, trainable=False)
    ids = torch.randint(5, 300, (2, 11))
    with torch.no_grad():
        assert relative(loaded(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5
    assert loaded.ffba_settings.reads == "hidden"


def test_normed_reads_take_the_sub_blocks_normed_input():
    """With reads=normed, z after a sub-block is A·x for that sub-block's normed input x (what its q/k/v or
    gate/up read), not A·h of its output projection's input; the fused form carries the same z."""
    model = _trained_like(_tiny(), Settings(rank=4, alpha=8, adapters="backward", reads="normed"))
    layer, seen = model.model.layers[1], {}
    layer.input_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o))
    layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o))
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        model(input_ids=ids)
        carried = {b: junctions(model)[f"layers.1.{b}"].emit.carrier.z[f"layers.1.{b}"] for b in ("attn", "mlp")}
        for block in ("attn", "mlp"):
            A = junctions(model)[f"layers.1.{block}"].A
            assert torch.allclose(carried[block], seen[block] @ A.T, atol=1e-6)
        fused = fuse(copy.deepcopy(model))
        fused(input_ids=ids)
        fused_z = fused.model.layers[1].mlp.carrier.z
        for block in ("attn", "mlp"):
            assert torch.allclose(fused_z[f"layers.1.{block}"], carried[block], atol=1e-5)


def test_artifact_with_wrong_variant_tensors_is_refused(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    settings = Settings(rank=4, alpha=8, adapters="both")
    io.save(_trained_like(copy.deepcopy(base), settings), settings, tmp_path)
    raw = json.loads((tmp_path / "ffba_config.json").read_text())
    (tmp_path / "ffba_config.json").write_text(json.dumps({**raw, "adapters": "backward", "split": None}))
    with pytest.raises(ValueError, match="adapter tensors do not match"):
        get_method("ffba").load(copy.deepcopy(base), tmp_path)


def test_gradients_reach_both_factors_through_the_carrier():
    model = _trained_like(_tiny(), Settings(rank=4, alpha=8, adapters="backward")).train()
    model(input_ids=torch.randint(5, 300, (2, 6))).logits.square().mean().backward()
    for junction in junctions(model).values():
        assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in junction.parameters())


def test_a_trained_model_can_be_copied_and_fused():
    """The carrier holds the last pass's z (with its autograd graph); copying the model must not copy it."""
    model = _trained_like(_tiny(), Settings(rank=4, alpha=8, adapters="both")).train()
    model(input_ids=torch.randint(5, 300, (1, 6))).logits.sum().backward()
    copied = fuse(copy.deepcopy(model))
    ids = torch.randint(5, 300, (1, 7))
    with torch.no_grad():
        assert relative(copied(input_ids=ids).logits, model.eval()(input_ids=ids).logits) <= 1e-5


@pytest.mark.parametrize("overrides, message", [
    ({"method_args.adapters": "sideways"}, "adapters must be one of"),
    ({"method_args.split": 0.3}, "split only applies to adapters=both"),
    ({"method_args.adapters": "both", "method_args.split": 1.0}, r"split must be a number in \(0, 1\)"),
    ({"method_args.adapters": "both", "rank": 1}, "both need >= 1"),
    ({"method_args.adapters": "backward", "parallel": "fsdp"}, "parallel=fsdp trains only adapters=forward"),
    ({"method_args.adapters": "backward", "method_args.reads": "output"}, "reads must be one of hidden, normed"),
    ({"method_args.reads": "normed"}, "reads=normed applies to backward adapters"),
])
def test_bad_options_are_refused(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(method="ffba", **overrides))


def test_one_layer_model_has_no_junction_after_its_mlp():
    with pytest.raises(ConfigError, match="no junction"):
        inject(_tiny(layers=1), Settings(rank=2, alpha=4, adapters="backward", blocks=("mlp",)))
