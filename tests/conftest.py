"""Shared fixtures: one tiny random Llama directory per test session, and fast run configs on it."""
from __future__ import annotations

import pytest
import torch

from rankwise.config import load_config
from rankwise.tiny import make_tiny_model_dir

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_cfg(tiny_model_dir, tmp_path):
    """Build a Config for a seconds-long run on the tiny model; keyword overrides as key=value."""

    def make(**overrides):
        base = {"model": str(tiny_model_dir), "steps": 6, "batch_size": 4, "eval_examples": 8, "eval_every": 3,
                "max_length": 256, "lr": 3e-3, "rank": 4, "alpha": 8, "sample": False, "precision": "fp32",
                "out": str(tmp_path / "run"), "warmup_steps": 1}
        base.update(overrides)
        return load_config(None, [f"{k}={v}" for k, v in base.items()])

    return make
