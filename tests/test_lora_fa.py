"""LoRA-FA: corrected gradient, frozen A, PEFT reference trajectory, memory kept, artifact, config."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from rankwise.config import ConfigError, load_config
from rankwise.lorafa import FrozenALinear, lora_layers, to_lora_fa
from rankwise.lorafa.branch import _dropout_mask
from rankwise.methods import get_method
from rankwise.tiny import tiny_llama


class Net(torch.nn.Module):
    def __init__(self, d_in=16, d_out=12):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _lora(net, r=4, alpha=8, dropout=0.0):
    torch.manual_seed(1)
    return get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"]))


def _randomize_B(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))


def test_corrected_gradient_equals_hand_formula_and_input_gradient_is_exact():
    torch.manual_seed(0)
    plain = _lora(Net())
    _randomize_B(plain)
    fa = to_lora_fa(copy.deepcopy(plain), delta=1e-3)
    for _, layer in lora_layers(plain):
        layer.lora_A["default"].weight.requires_grad_(False)
    x = torch.randn(3, 5, 16)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = plain(x1), fa(x2)
    torch.testing.assert_close(y1, y2)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()

    (_, p_layer), (_, f_layer) = lora_layers(plain)[0], lora_layers(fa)[0]
    A = p_layer.lora_A["default"].weight
    s = p_layer.scaling["default"]
    g_B = p_layer.lora_B["default"].weight.grad
    by_hand = g_B @ torch.linalg.inv(A @ A.T + 1e-3 * torch.eye(A.shape[0])) / s**2
    torch.testing.assert_close(f_layer.lora_B["default"].weight.grad, by_hand, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(by_hand, g_B, rtol=1e-2)  # the correction is not a no-op here
    torch.testing.assert_close(x2.grad, x1.grad)  # the input gradient is the true one
    assert f_layer.lora_A["default"].weight.grad is None


def test_dropout_mask_is_replayed_in_backward():
    torch.manual_seed(0)
    fa = to_lora_fa(_lora(Net(), dropout=0.5))
    _randomize_B(fa)
    layer = lora_layers(fa)[0][1]
    x = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(7)
    y = fa(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what the branch drew
    mask = _dropout_mask(x.shape, 0.5, seed, x.dtype, x.device)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer.base_layer(x_ref) + (x_ref * mask) @ A.T @ B.T * layer.scaling["default"]
    torch.testing.assert_close(y, y_ref)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def _saved_activation_bytes(model, x) -> int:
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_bytes_scale_with_rank_not_input_width(dropout):
    tokens = 32
    for d_in in (64, 256):
        for r in (2, 8):
            x = torch.randn(tokens, d_in, requires_grad=True)
            fa = to_lora_fa(_lora(Net(d_in, 32), r=r, dropout=dropout))
            assert _saved_activation_bytes(fa, x) == tokens * r * 4  # u = A·x only
            lora = _lora(Net(d_in, 32), r=r, dropout=dropout)  # A trainable: x is kept
            assert _saved_activation_bytes(lora, x) >= tokens * d_in * 4


def _tiny_peft(seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(256, hidden=64, layers=2, intermediate=128)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _trajectory(model, optimizer, batches):
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("exact", [True, False])
def test_same_trajectory_as_peft_lorafa_optimizer(monkeypatch, exact):
    import peft.optimizers.lorafa as peft_lorafa
    from peft.optimizers import create_lorafa_optimizer

    torch.manual_seed(3)
    batches = [torch.randint(0, 256, (2, 24))] * 6  # one batch, memorised: the loss must fall
    reference = _tiny_peft()
    ours = to_lora_fa(copy.deepcopy(reference), delta=1e-8)
    if exact:  # PEFT applies its correction under bf16 autocast on CPU; compare the fp32 math
        monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    ref_opt = create_lorafa_optimizer(reference, r=4, lora_alpha=8, lr=5e-3)
    eps = 1e-12  # PEFT adds eps after Adam's bias correction, torch before: make it vanish in both
    ref_opt.param_groups[0]["eps"] = eps
    our_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-3, eps=eps,
                                weight_decay=0.0)
    ref_losses = _trajectory(reference, ref_opt, batches)
    our_losses = _trajectory(ours, our_opt, batches)
    assert ref_losses[-1] < ref_losses[0]
    tol = 1e-5 if exact else 2e-3
    assert our_losses == pytest.approx(ref_losses, rel=tol)
    for (n, ref_layer), (_, our_layer) in zip(lora_layers(reference), lora_layers(ours)):
        ref_B, our_B = ref_layer.lora_B["default"].weight, our_layer.lora_B["default"].weight
        assert torch.linalg.norm(ref_B - our_B) <= (1e-4 if exact else 2e-2) * torch.linalg.norm(ref_B), n


def test_recipe_trains_B_only_and_the_adapter_loads_in_plain_peft(tiny_cfg, tiny_model_dir):
    from rankwise.models import load_model
    from rankwise.train import checkpoint as ckpt
    from rankwise.recipes.train import build_run, train_step

    cfg = tiny_cfg(method="lora-fa", steps=8, lr=1e-2, **{"method_args.delta": 1e-6})
    run = build_run(cfg, say=lambda *a: None)
    start_loss = run.test_loss()
    layers = lora_layers(run.model)
    assert layers and all(isinstance(layer, FrozenALinear) for _, layer in layers)
    A0 = [layer.lora_A["default"].weight.detach().clone() for _, layer in layers]
    B0 = [layer.lora_B["default"].weight.detach().clone() for _, layer in layers]
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable)
    for _ in range(cfg.steps):
        train_step(run)
    assert run.test_loss() < start_loss
    for (_, layer), a0, b0 in zip(layers, A0, B0):
        assert torch.equal(layer.lora_A["default"].weight, a0)  # frozen: bit-identical
        assert not torch.equal(layer.lora_B["default"].weight, b0)

    adapter = run.save() / ckpt.ADAPTER
    ids = torch.randint(0, 200, (2, 20))
    run.model.eval()
    with torch.no_grad():
        trained = run.model(input_ids=ids).logits
        plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), adapter).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, trained)
    resumed = get_method("lora-fa").load(load_model(str(tiny_model_dir)), adapter, trainable=True)
    (_, first), *_ = lora_layers(resumed)
    assert isinstance(first, FrozenALinear) and first.fa_delta == 1e-6
    assert not first.lora_A["default"].weight.requires_grad and first.lora_B["default"].weight.requires_grad


def test_train_command_reduces_held_out_loss(tiny_cfg):
    from rankwise.recipes.train import train

    summary = train(tiny_cfg(method="lora-fa", steps=8, lr=1e-2), say=lambda *a: None)
    assert summary["eval_loss"] < summary["eval_loss_start"]


def test_svd_init_uses_top_right_singular_vectors():
    torch.manual_seed(0)
    net = Net(32, 24)
    fa = to_lora_fa(_lora(net, r=4), init="svd")
    layer = lora_layers(fa)[0][1]
    A = layer.lora_A["default"].weight
    torch.testing.assert_close(A @ A.T, torch.eye(4) / 3, atol=1e-5, rtol=0)  # orthogonal, Kaiming row norm
    W = layer.base_layer.weight.detach()
    top = torch.linalg.svdvals(W)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(W @ A.T) * math.sqrt(3), top, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arg, message", [
    ("method_args.init=orthogonal", "method_args.init"),
    ("method_args.delta=-1", "method_args.delta"),
    ("method_args.delta=true", "method_args.delta"),
    ("method_args.use_rslora=maybe", "use_rslora"),
    ("method_args.lr_B=2", "does not take method_args"),
    ("dropout=1.5", "dropout"),
])
def test_bad_method_args_are_rejected(arg, message):
    cfg = load_config(None, ["method=lora-fa", arg])
    with pytest.raises(ConfigError, match=message):
        get_method("lora-fa").spec(cfg)


def test_fast_forward_extrapolates_only_B(tiny_cfg):
    from rankwise.train.metrics import read_metrics
    from rankwise.recipes.train import build_run, train_step

    cfg = tiny_cfg(method="lora-fa", steps=12, lr=1e-2, schedule="constant", fast_forward=True,
                   **{"ff.interval": 3, "ff.burn_in": 3})
    run = build_run(cfg, say=lambda *a: None)
    A0 = [layer.lora_A["default"].weight.detach().clone() for _, layer in lora_layers(run.model)]
    for hook in run.hooks:
        hook.on_train_start(run)
    for _ in range(cfg.steps):
        train_step(run)
        for hook in run.hooks:
            hook.after_step(run)
    run.log_file.close()
    stages = [r for r in read_metrics(f"{cfg.out}/metrics.jsonl") if r["kind"] == "ff"]
    assert stages and any(r["accepted"] > 0 for r in stages)
    for (_, layer), a0 in zip(lora_layers(run.model), A0):
        assert torch.equal(layer.lora_A["default"].weight, a0)  # FF moved B, never the frozen A
