"""A new method and a new optimizer, each one file in a package rankwise has never seen, train through
the recipe: plugins.py's promise ("one new file, nothing else edited"), kept."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from rankwise import plugins
from rankwise.config import ConfigError
from rankwise.methods import METHODS
from rankwise.optim import OPTIMIZERS
from rankwise.recipes.train import train
from rankwise.train.metrics import read_metrics

METHOD_FILE = '''
"""Train only the RMSNorm weights (a BitFit-like method), saved as one safetensors file."""
from dataclasses import dataclass

from rankwise.methods import Method, register


@dataclass(frozen=True)
class NormsOptions:
    lm_head: bool = False  # also train the output head

    def __post_init__(self):
        if not isinstance(self.lm_head, bool):
            raise ValueError(f"method_args.lm_head must be true or false, got {self.lm_head!r}")


class Norms(Method):
    name = "norms-demo"
    Options = NormsOptions
    update = "full"  # whole tensors train, so full-weight optimizers may pair with it
    low_rank = False

    def adapt(self, model, spec):
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name or spec.options.lm_head and "lm_head" in name)
        return model

    def save(self, model, path):
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(path / "norms.safetensors"))

    def load(self, base, path, trainable=False):
        from safetensors.torch import load_file

        state = load_file(str(path / "norms.safetensors"))
        base.load_state_dict(state, strict=False)
        for name, p in base.named_parameters():
            p.requires_grad_(trainable and name in state)
        return base


register(Norms())
'''

OPTIMIZER_FILE = '''
"""Plain SGD with momentum from torch.optim, as a registry entry."""
from dataclasses import dataclass

import torch

from rankwise.optim import register, trainable_parameters


@dataclass(frozen=True)
class SGDOptions:
    momentum: float = 0.0

    def __post_init__(self):
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optimizer_args.momentum must lie in [0, 1), got {self.momentum!r}")


def build(model, spec):
    return torch.optim.SGD(trainable_parameters(model), lr=spec.lr, momentum=spec.options.momentum,
                           weight_decay=spec.weight_decay)


register("sgd-demo", build, SGDOptions, updates=("full",), needs="whole tensors")
'''


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """A package `demo_plugins` with one file per plugin, installed the way pip would leave it: a
    dist-info folder naming each file under its registry's entry-point group."""
    package = tmp_path / "demo_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "norms.py").write_text(textwrap.dedent(METHOD_FILE))
    (package / "sgd.py").write_text(textwrap.dedent(OPTIMIZER_FILE))
    info = tmp_path / "demo_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text('[rankwise.methods]\nnorms-demo = demo_plugins.norms\n\n'
                                           '[rankwise.optim]\nsgd-demo = demo_plugins.sgd\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    METHODS.pop("norms-demo", None)
    OPTIMIZERS.pop("sgd-demo", None)
    for name in [m for m in sys.modules if m.startswith("demo_plugins")]:
        del sys.modules[name]


def test_a_method_and_an_optimizer_from_one_file_each_train(installed_plugins, tiny_cfg):
    assert plugins.load_installed("rankwise.methods") == ["norms-demo"]
    assert plugins.load_installed("rankwise.optim") == ["sgd-demo"]
    cfg = tiny_cfg(method="norms-demo", optimizer="sgd-demo", lr=0.5, steps=4, eval_every=0,
                   **{"optimizer_args.momentum": 0.9})
    summary = train(cfg, say=lambda *a: None)
    assert summary["eval_loss"] < summary["eval_loss_start"]  # the norms trained, through our optimizer
    records = read_metrics(cfg.out + "/metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    from safetensors.torch import load_file

    saved = load_file(summary["checkpoint"] + "/adapter/norms.safetensors")
    assert saved and all("norm" in name for name in saved)
    assert any(not torch.equal(t, torch.ones_like(t)) for t in saved.values())  # RMSNorm starts at ones


def test_plugin_options_and_capabilities_are_checked_before_loading(installed_plugins, tiny_cfg):
    from rankwise.validate import validate

    plugins.load_installed("rankwise.methods")
    plugins.load_installed("rankwise.optim")
    with pytest.raises(ConfigError, match="momentum must lie in"):
        validate(tiny_cfg(method="norms-demo", optimizer="sgd-demo", **{"optimizer_args.momentum": 1.5}))
    with pytest.raises(ConfigError, match="does not take method_args"):
        validate(tiny_cfg(method="norms-demo", **{"method_args.bias": True}))
    # the optimizer declared it needs whole tensors: LoRA factors are refused by the registry
    with pytest.raises(ConfigError, match="sgd-demo.*whole tensors.*method=.*full.*norms-demo"):
        validate(tiny_cfg(method="lora", optimizer="sgd-demo"))
    # and LoFT, which needs LoRA factors, refuses the new method by its declared update form
    with pytest.raises(ConfigError, match="LoRA factors"):
        validate(tiny_cfg(method="norms-demo", optimizer="loft"))
    # nothing declared FSDP support for the new method
    with pytest.raises(ConfigError, match="parallel=fsdp does not support method 'norms-demo'"):
        validate(tiny_cfg(method="norms-demo", parallel="fsdp"))
