"""LoRA and DoRA through PEFT itself: the artifact is PEFT's, loadable with PeftModel.from_pretrained."""
from __future__ import annotations

from pathlib import Path

from rankwise.config import Config, ConfigError
from rankwise.methods import Method, check_low_rank, register

BIASES = ("none", "all", "lora_only")  # PEFT's LoraConfig.bias


class PeftLora(Method):
    mergeable = True

    def __init__(self, name: str, use_dora: bool):
        self.name = name
        self.use_dora = use_dora

    def check(self, cfg: Config) -> None:
        check_low_rank(cfg)
        args = cfg.method_args
        unknown = set(args) - {"init_lora_weights", "use_rslora", "bias"}
        if unknown:
            raise ConfigError(f"method {self.name!r} does not take method_args {sorted(unknown)}")
        if args.get("bias", "none") not in BIASES:
            raise ConfigError(f"method_args.bias must be one of {', '.join(BIASES)}, got {args['bias']!r}")
        if not isinstance(args.get("use_rslora", False), bool):
            raise ConfigError(f"method_args.use_rslora must be true or false, got {args['use_rslora']!r}")
        if not isinstance(args.get("init_lora_weights", True), (bool, str)):  # PEFT checks the names
            raise ConfigError(f"method_args.init_lora_weights must be true, false or a PEFT init name, "
                              f"got {args['init_lora_weights']!r}")

    def lora_config(self, cfg: Config):
        from peft import LoraConfig

        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, use_dora=self.use_dora,
                          task_type="CAUSAL_LM", **cfg.method_args)

    def apply(self, model, cfg: Config):
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.lora_config(cfg))
        except ValueError as e:  # e.g. target modules not found in this architecture
            raise ConfigError(f"{self.name}: {str(e).splitlines()[0]}") from None

    def save(self, model, path: Path) -> None:
        # embeddings are never adapted here; "auto" would probe the base model's config.json for a
        # resized vocabulary, which the GGUF default does not have, and warn on every save
        model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)

    def load(self, base, path: Path, trainable: bool = False):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, path, is_trainable=trainable)

    def merge(self, model):
        return model.merge_and_unload()


register(PeftLora("lora", use_dora=False))
register(PeftLora("dora", use_dora=True))
