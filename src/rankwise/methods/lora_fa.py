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
import sys
from pathlib import Path

from rankwise.config import Config, ConfigError
from rankwise.methods import Method, check_low_rank, register

ARGS_FILE = "lora_fa.json"
INITS = ("kaiming", "svd")  # mirrors rankwise.lorafa.INITS without importing peft at check time


class LoraFA(Method):
    name = "lora-fa"
    mergeable = True

    def check(self, cfg: Config) -> None:
        check_low_rank(cfg)
        args = cfg.method_args
        unknown = set(args) - {"init", "delta", "use_rslora"}
        if unknown:
            raise ConfigError(f"method 'lora-fa' does not take method_args {sorted(unknown)}; "
                              f"it takes init, delta, use_rslora")
        if args.get("init", "kaiming") not in INITS:
            raise ConfigError(f"method_args.init must be one of {', '.join(INITS)}, got {args['init']!r}")
        delta = args.get("delta", 1e-8)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta <= sys.float_info.max:
            raise ConfigError(f"method_args.delta must be a finite number >= 0, got {delta!r}")
        if not isinstance(args.get("use_rslora", False), bool):
            raise ConfigError(f"method_args.use_rslora must be true or false, got {args['use_rslora']!r}")

    def apply(self, model, cfg: Config):
        from peft import LoraConfig, get_peft_model

        from rankwise.lorafa import to_lora_fa

        args = cfg.method_args
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=cfg.target_modules, use_rslora=args.get("use_rslora", False),
                            init_lora_weights=True, bias="none", task_type="CAUSAL_LM")
        try:
            peft_model = get_peft_model(model, config)
            init = "svd" if args.get("init") == "svd" else None
            return to_lora_fa(peft_model, delta=float(args.get("delta", 1e-8)), init=init)
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
