"""Checks the FFBA test files share (imported by name: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def fused_matches_and_resaves(method, unfused, fused, ids: torch.Tensor, base_dir, out) -> None:
    """The fused inference model gives the unfused one's logits (relative 1e-5), and the unfused model saved
    again to `out` (a new folder) and reloaded onto a fresh base gives exactly the same logits."""
    unfused.eval()
    with torch.no_grad():
        a, b = unfused(input_ids=ids).logits, fused(input_ids=ids).logits
    assert relative(b, a) <= 1e-5
    out.mkdir()
    method.save(unfused, out)
    again = method.load(AutoModelForCausalLM.from_pretrained(base_dir), out, trainable=True).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, a)
