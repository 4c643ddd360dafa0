"""LoRA and DoRA through PEFT itself: the artifact is PEFT's, loadable with PeftModel.from_pretrained."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rankwise.config import Config, ConfigError
from rankwise.methods import Method, MethodSpec, register
from rankwise.options import BOOL, check, one_of, set_fields

BIASES = ("none", "all", "lora_only")  # PEFT's LoraConfig.bias


@dataclass(frozen=True)
class LoraOptions:
    """method_args passed to PEFT's LoraConfig as they are (unset: PEFT's default)."""

    init_lora_weights: bool | str | None = None  # PEFT checks the names
    use_rslora: bool | None = None
    bias: str | None = None

    def __post_init__(self):
        check(self, "method_args.", {"bias": one_of(*BIASES), "use_rslora": BOOL,
                                     "init_lora_weights": (lambda v: isinstance(v, (bool, str)),
                                                           "true, false or a PEFT init name")})


class PeftLora(Method):
    mergeable = True
    Options = LoraOptions
    fsdp = True

    def __init__(self, name: str, use_dora: bool):
        self.name = name
        self.use_dora = use_dora
        self.update = "dora" if use_dora else "lora"  # DoRA's W is not W0 + s·B·A

    def lora_config(self, spec: MethodSpec | Config):
        from peft import LoraConfig

        spec = self.spec(spec) if isinstance(spec, Config) else spec
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=spec.target_modules, use_dora=self.use_dora,
                          task_type="CAUSAL_LM", **set_fields(spec.options))

    def adapt(self, model, spec: MethodSpec):
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.lora_config(spec))
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
