"""Turn a PEFT LoRA model into LoRA-FA in place: freeze A, precompute (AAᵀ+δI)⁻¹, swap the forward.

Design: PEFT builds the adapter (standard init, its state-dict keys, its merge), so the artifact
stays a plain PEFT LoRA adapter that `PeftModel.from_pretrained` loads. We only change *how the
branch trains*: each `peft.tuners.lora.Linear` becomes a `FrozenALinear`, whose forward runs the
branch through `FrozenABranch` (saves A·x only, hands B the corrected gradient). Because the
correction lives in the backward, any torch optimizer works on B unchanged.
"""
from __future__ import annotations

import math

import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from rankwise.lorafa.branch import frozen_a_branch, gram_inverse

INITS = ("kaiming", "svd")


class FrozenALinear(PeftLoraLinear):
    """PEFT's LoRA Linear with A frozen; the training forward saves only A·x for the adapter branch."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            drop = self.lora_dropout[name]
            p = float(getattr(drop, "p", 0.0)) if drop.training else 0.0
            result = result + frozen_a_branch(x, self.lora_A[name].weight, self.lora_B[name].weight,
                                              self.fa_gram_inv, self.scaling[name], p)
        return result.to(out_dtype)

    def refresh_gram_inverse(self, delta: float) -> None:
        """Recompute (AAᵀ+δI)⁻¹ from the (frozen) A; call after A changes (init, load)."""
        (name,) = self.lora_A.keys()
        self.fa_delta = delta
        self.register_buffer("fa_gram_inv", gram_inverse(self.lora_A[name].weight, delta), persistent=False)

    def __repr__(self) -> str:
        return "lora_fa." + super().__repr__()


def lora_layers(model) -> list[tuple[str, PeftLoraLinear]]:
    # exact type: PEFT's quantized / other-backend subclasses have forwards we do not replace
    return [(n, m) for n, m in model.named_modules() if type(m) in (PeftLoraLinear, FrozenALinear)]


def svd_rows(weight: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r right singular vectors of W (out × in) as rows (r × in), scaled to Kaiming's row norm.

    Kaiming-uniform(a=√5) rows have E‖a‖² = 1/3; matching it keeps the step size s·ΔB·A of the two
    inits equal, so a comparison measures the directions only.
    """
    _, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    if r > vh.shape[0]:
        raise ValueError(f"rank {r} exceeds the {vh.shape[0]} singular vectors of a {tuple(weight.shape)} weight")
    return vh[:r] / math.sqrt(3.0)


def to_lora_fa(model, delta: float = 1e-8, init: str | None = None):
    """Convert every PEFT LoRA Linear in `model` to LoRA-FA in place; returns `model`.

    init: None keeps A as it is (PEFT's Kaiming-uniform, or a loaded A); "svd" replaces A by the
    base weight's top right-singular vectors. A is frozen, B stays trainable.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("no LoRA Linear layers to convert (LoRA-FA adapts Linear layers only)")
    for name, layer in layers:
        if len(layer.lora_A) != 1:
            raise ValueError(f"{name}: LoRA-FA supports one adapter per layer, found {list(layer.lora_A)}")
        if layer.lora_variant:
            raise ValueError(f"{name}: LoRA-FA does not combine with LoRA variants such as DoRA")
        (adapter,) = layer.lora_A.keys()
        if layer.lora_B[adapter].bias is not None:
            raise ValueError(f"{name}: LoRA-FA does not train a lora bias")
        A = layer.lora_A[adapter].weight
        if init == "svd":
            W = layer.get_base_layer().weight
            W = W.T if layer.fan_in_fan_out else W
            with torch.no_grad():
                A.copy_(svd_rows(W, A.shape[0]).to(A.dtype))
        A.requires_grad_(False)
        layer.__class__ = FrozenALinear
        layer.refresh_gram_inverse(delta)
    return model
