"""method_args.init_lora_weights: the installed PEFT's names, checked before loading; PiSSA/OLoRA runs (which
rewrite W0) reload to the same logits and text and resume exactly; LoFT and Fast Forward compose with them."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from rankwise import cli, models
from rankwise.config import ConfigError
from rankwise.methods import MethodSpec, get_method
from rankwise.methods.peft_lora import NEEDS, LoraOptions, peft_init_names, usable_init_names
from rankwise.optim import LoFT
from rankwise.recipes.train import build_run, train, train_step
from rankwise.tiny import tiny_llama
from rankwise.train.metrics import read_metrics
from rankwise.validate import validate


def _concrete(name: str) -> str:
    return name.replace("_N", "_2") if name.endswith("_N") else name


@pytest.mark.parametrize("name", ["pissa", "pissa_niter_2", "olora", "gaussian", "orthogonal", "mica", "no_such",
                                  "pissa_niter_", "Pissa"])
def test_what_we_accept_is_what_the_installed_peft_runs(name):
    """Our check reads PEFT's LoraConfig annotation; PEFT itself must run every name we accept and fail on
    the unknown ones we refuse, so neither side can drift."""
    accepted = name in [_concrete(n) for n in usable_init_names()]
    assert accepted == (name in ("pissa", "pissa_niter_2", "olora", "gaussian", "orthogonal", "mica"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=name)
    if accepted:
        LoraOptions(init_lora_weights=name)
        get_peft_model(tiny_llama(300), config)
    else:
        with pytest.raises(ValueError, match="init_lora_weights must be true, false or one of"):
            LoraOptions(init_lora_weights=name)
        with pytest.raises(ValueError):
            get_peft_model(tiny_llama(300), config)


def test_refused_names_are_the_ones_peft_declares_but_we_cannot_feed():
    declared = peft_init_names()
    assert {"eva", "corda", "loftq"} <= set(declared) and {"eva", "corda", "loftq"} <= set(NEEDS)
    assert not set(usable_init_names()) & set(NEEDS)


@pytest.mark.parametrize("overrides, message", [
    ({"method_args.init_lora_weights": "pisa"}, r"init_lora_weights must be true, false or one of the installed "
                                                r"PEFT's gaussian, olora, pissa, pissa_niter_N, .*got 'pisa'"),
    ({"method_args.init_lora_weights": "pissa_niter_x"}, "got 'pissa_niter_x'"),
    ({"method_args.init_lora_weights": "eva"}, "init_lora_weights=eva needs a pass over the training data"),
    ({"method_args.init_lora_weights": "corda"}, "init_lora_weights=corda needs a covariance pass"),
    ({"method_args.init_lora_weights": "loftq"}, "init_lora_weights=loftq needs loftq_config"),
    ({"method_args.init_lora_weights": "lora_ga"}, "init_lora_weights=lora_ga needs estimated gradients"),
    ({"method_args.init_lora_weights": "orthogonal", "rank": 3}, "orthogonal needs an even rank, got rank=3"),
    ({"method_args.init_lora_weights": "mica", "method": "dora"}, "mica is a LoRA variant PEFT does not combine"),
])
def test_bad_inits_are_one_line_errors_before_loading(tiny_cfg, monkeypatch, overrides, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ConfigError, match=message) as refused:
        validate(tiny_cfg(**overrides))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("method, init", [("lora", "pissa"), ("lora", "olora"), ("lora", "pissa_niter_2"),
                                          ("dora", "pissa")])
def test_a_trained_run_that_rewrote_w0_reloads_to_the_same_logits_and_text(tiny_cfg, capsys, method, init):
    from rankwise.generate import generate, load_for_inference

    cfg = tiny_cfg(method=method, steps=3, eval_every=0, lr=1e-2, **{"method_args.init_lora_weights": init})
    run = build_run(cfg, say=lambda *_: None)
    base = {n: p.detach().clone() for n, p in tiny_llama_from(cfg).named_parameters()}
    moved = [n for n, p in run.model.named_parameters() if n.endswith("base_layer.weight")
             and not torch.equal(p, base[n.replace("base_model.model.", "").replace(".base_layer", "")])]
    assert moved  # the init rewrote W0 (W0' = W0 - s·B0·A0)
    for _ in range(3):
        train_step(run)
    checkpoint = run.save()
    run.log_file.close()
    run.model.eval()
    ids = torch.randint(5, 300, (2, 17))
    with torch.no_grad():
        want = run.model(input_ids=ids).logits
        loaded, tok = load_for_inference(None, str(checkpoint))
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
    prompt = [{"role": "user", "content": "What does os.path.join do?"}]
    text = generate(run.model, tok, prompt, max_new_tokens=12)
    capsys.readouterr()
    assert cli.main(["generate", "What does os.path.join do?", "--adapter", str(checkpoint),
                     "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == text


def tiny_llama_from(cfg):
    return models.load_model(cfg.model)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_runs_resume_exactly(tiny_cfg, tmp_path, init):
    common = dict(steps=6, lr=3e-3, save_every=3, eval_every=0, **{"method_args.init_lora_weights": init})
    whole = train(tiny_cfg(out=str(tmp_path / "whole"), **common), say=lambda *_: None)
    split = tmp_path / "split"
    train(tiny_cfg(out=str(split), **common), say=lambda *_: None)
    resumed = train(tiny_cfg(out=str(split), resume=str(split / "checkpoints/step-000003"), **common),
                    say=lambda *_: None)
    a, b = (load_file(f"{s['checkpoint']}/adapter/adapter_model.safetensors") for s in (whole, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed["eval_loss"] == whole["eval_loss"] < whole["eval_loss_start"]


# ---- composition ------------------------------------------------------------------------------
class Square(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.fc = torch.nn.Linear(n, n, bias=False)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def test_loft_on_a_full_rank_pissa_adapter_is_adamw_on_w():
    """PiSSA keeps W = W0' + s·B·A on the residual W0', so LoFT's full-rank identity still holds: its steps
    on (A, B) equal torch AdamW's on W."""
    n = 8
    gen = torch.Generator().manual_seed(0)
    model = Square(n)
    with torch.no_grad():  # well-conditioned W0, so PiSSA's factors are too
        model.fc.weight.copy_(torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n ** 0.5)
    model = get_peft_model(model, LoraConfig(r=n, lora_alpha=n, target_modules=["fc"], init_lora_weights="pissa"))
    model = model.double()
    layer = model.base_model.model.fc
    W0 = layer.base_layer.weight.detach()
    assert float(W0.norm()) < 1e-4  # at full rank PiSSA moved all of W0 into the adapter
    W = torch.nn.Parameter((W0 + layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().clone())
    target = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    opts = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    reference = torch.optim.AdamW([W], **opts)
    loft = LoFT.from_peft_model(model, ridge=1e-15, **opts)
    worst = 0.0
    for _ in range(60):
        X = torch.randn(16, n, generator=gen, dtype=torch.float64)
        Y = torch.tanh(X @ target.T)
        reference.zero_grad()
        ((torch.tanh(X @ W.T) - Y) ** 2).mean().backward()
        reference.step()
        loft.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        loft.step()
        with torch.no_grad():
            now = W0 + layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            worst = max(worst, float((now - W).norm() / W.norm()))
    assert worst < 1e-6


def test_fast_forward_runs_on_a_pissa_adapter(tiny_cfg):
    cfg = tiny_cfg(steps=12, lr=3e-3, schedule="constant", fast_forward=True,
                   **{"ff.interval": 3, "ff.burn_in": 3, "method_args.init_lora_weights": "pissa"})
    summary = train(cfg, say=lambda *_: None)
    stages = [r for r in read_metrics(f"{cfg.out}/metrics.jsonl") if r["kind"] == "ff"]
    assert stages and all(r["loss_after"] <= r["loss_before"] for r in stages)
    assert summary["eval_loss"] < summary["eval_loss_start"]
