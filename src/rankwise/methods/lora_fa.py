"""LoRA-FA: LoRA with the down-projection A frozen and only B trained, on the corrected gradient.

`rankwise train method=lora-fa` — options (method_args):
  init=kaiming|svd   frozen A from PEFT's standard Kaiming-uniform init (default, as in the paper),
                     or the base weight's top-r right-singular vectors (a rankwise option, not the
                     paper's; see docs/results/lora-fa.md for whether it helps)
  delta=1e-8         ridge δ in g̃_B = g_B (AAᵀ + δI)⁻¹ / s²
  use_rslora=false   s = alpha/√r instead of alpha/r

The artifact is a plain PEFT LoRA adapter (A is saved too: it is random, so it cannot be
recomputed), plus lora_fa.json with δ so a resumed run corrects the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rankwise.config import ConfigError
from rankwise.methods import Method, MethodSpec, register
from rankwise.options import BOOL, FINITE_NON_NEGATIVE, check, one_of

ARGS_FILE = "lora_fa.json"
INITS = ("kaiming", "svd")  # mirrors rankwise.lorafa.INITS without importing peft at check time


@dataclass(frozen=True)
class LoraFAOptions:
    init: str = "kaiming"
    delta: float = 1e-8
    use_rslora: bool = False

    def __post_init__(self):
        check(self, "method_args.", {"init": one_of(*INITS), "delta": FINITE_NON_NEGATIVE, "use_rslora": BOOL})


class LoraFA(Method):
    name = "lora-fa"
    mergeable = True
    Options = LoraFAOptions
    update = "lora-fa"  # only B trains, on a corrected gradient
    fsdp = True

    def adapt(self, model, spec: MethodSpec):
        from peft import LoraConfig, get_peft_model

        from rankwise.lorafa import to_lora_fa

        options = spec.options
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                            target_modules=spec.target_modules, use_rslora=options.use_rslora,
                            init_lora_weights=True, bias="none", task_type="CAUSAL_LM")
        try:
            peft_model = get_peft_model(model, config)
            init = "svd" if options.init == "svd" else None
            return to_lora_fa(peft_model, delta=float(options.delta), init=init)
        except ValueError as e:  # target modules missing, non-Linear targets, rank above d_in for svd
            raise ConfigError(f"lora-fa: {str(e).splitlines()[0]}") from None

    def save(self, model, path: Path) -> None:
        from rankwise.lorafa import lora_layers

        model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
        delta = next(layer.fa_delta for _, layer in lora_layers(model))
        (path / ARGS_FILE).write_text(json.dumps({"delta": delta}))

    def load(self, base, path: Path, trainable: bool = False):
        """Plain PEFT for inference (the forward is the same); LoRA-FA layers again when training."""
        from peft import PeftModel

        from rankwise.lorafa import to_lora_fa

        model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
        if trainable:
            args = json.loads((path / ARGS_FILE).read_text()) if (path / ARGS_FILE).is_file() else {}
            to_lora_fa(model, delta=args.get("delta", 1e-8))
        return model

    def merge(self, model):
        return model.merge_and_unload()


register(LoraFA())
