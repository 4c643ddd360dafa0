"""LoRA and DoRA through PEFT itself: the artifact is PEFT's, loadable with PeftModel.from_pretrained.

method_args.init_lora_weights takes the names the installed PEFT declares (pissa, pissa_niter_N, olora,
gaussian, orthogonal, mica, ...), except those needing inputs rankwise does not provide. PiSSA and OLoRA
move the top of W0 into the adapter (W0' = W0 - s·B0·A0, then W = W0' + s·B·A): the saved adapter keeps
its init name, and loading it (Method.load, or plain PEFT) derives W0' from W0 again, the same way.
"""
from __future__ import annotations

import contextlib
import functools
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise.config import Config, ConfigError
from rankwise.methods import Method, MethodSpec, register
from rankwise.options import BOOL, check, one_of, set_fields

BIASES = ("none", "all", "lora_only")  # PEFT's LoraConfig.bias
# init names PEFT knows that need inputs rankwise does not pass to LoraConfig or get_peft_model
NEEDS = {"eva": "a pass over the training data (eva_config, initialize_lora_eva_weights)",
         "corda": "a covariance pass over calibration data (corda_config, preprocess_corda)",
         "loftq": "loftq_config (and it quantises the base model)",
         "lora_ga": "estimated gradients (lora_ga_config, preprocess_loraga)"}
INIT_SEED = 0  # the draws of a randomised init that changes W0 (pissa_niter_N): the same at load


@functools.cache
def peft_init_names() -> tuple[str, ...]:
    """The string values of init_lora_weights that the installed PEFT's LoraConfig declares (its field's
    Literal), e.g. ("gaussian", "eva", "olora", "pissa", "pissa_niter_[number of iters]", ...)."""
    from peft import LoraConfig

    def literals(hint):
        if typing.get_origin(hint) is typing.Literal:
            return [a for a in typing.get_args(hint) if isinstance(a, str)]
        return [name for arg in typing.get_args(hint) for name in literals(arg)]

    return tuple(literals(typing.get_type_hints(LoraConfig)["init_lora_weights"]))


@functools.cache
def init_variants() -> tuple[str, ...]:
    """Init names that make a layer a LoRA variant of its own (e.g. mica), as LoraConfig's field declares."""
    import dataclasses

    from peft import LoraConfig

    field = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights")
    return tuple(field.metadata.get("lora_variants", ()))


def _pattern(name: str) -> str:
    """A declared name as a regular expression: a "[placeholder]" stands for a non-negative integer."""
    return "".join(r"\d+" if part.startswith("[") else re.escape(part) for part in re.split(r"(\[[^]]*\])", name))


def check_init_name(name) -> None:
    """ValueError (one line) unless `name` is true, false or an init PEFT declares and rankwise can run."""
    if isinstance(name, bool):
        return
    if name in NEEDS:
        raise ValueError(f"method_args.init_lora_weights={name} needs {NEEDS[name]}, which rankwise does not "
                         f"provide; use one of: {', '.join(usable_init_names())}")
    if not isinstance(name, str) or not any(re.fullmatch(_pattern(n), name) for n in peft_init_names()):
        raise ValueError(f"method_args.init_lora_weights must be true, false or one of the installed PEFT's "
                         f"{', '.join(usable_init_names())}; got {name!r}")


def usable_init_names() -> list[str]:
    return [re.sub(r"\[[^]]*\]", "N", n) for n in peft_init_names() if n not in NEEDS]


def changes_base(init) -> bool:
    """Whether this init rewrites the adapted base weights (W0' = W0 - s·B0·A0)."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


@dataclass(frozen=True)
class LoraOptions:
    """method_args passed to PEFT's LoraConfig as they are (unset: PEFT's default)."""

    init_lora_weights: bool | str | None = None  # checked against the installed PEFT's names
    use_rslora: bool | None = None
    bias: str | None = None

    def __post_init__(self):
        check(self, "method_args.", {"bias": one_of(*BIASES), "use_rslora": BOOL,
                                     "init_lora_weights": (lambda v: isinstance(v, (bool, str)),
                                                           "true, false or a PEFT init name")})
        if self.init_lora_weights is not None:
            check_init_name(self.init_lora_weights)


@contextlib.contextmanager
def _same_init_draws(init):
    """Around get_peft_model/from_pretrained: a randomised init that changes W0 draws from INIT_SEED, so
    loading derives the W0' training had; the run's own random stream is left as it was."""
    if not (changes_base(init) and "_niter_" in init):
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        yield


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

    def check(self, spec: MethodSpec, cfg: Config) -> None:
        init = spec.options.init_lora_weights
        if init == "orthogonal" and spec.rank % 2:
            raise ValueError(f"method_args.init_lora_weights=orthogonal needs an even rank, got rank={spec.rank}")
        if self.use_dora and init in init_variants():
            raise ValueError(f"method_args.init_lora_weights={init} is a LoRA variant PEFT does not combine with DoRA")

    def adapt(self, model, spec: MethodSpec):
        from peft import get_peft_model

        try:
            with _same_init_draws(spec.options.init_lora_weights):
                return get_peft_model(model, self.lora_config(spec))
        except ValueError as e:  # e.g. target modules not found in this architecture
            raise ConfigError(f"{self.name}: {str(e).splitlines()[0]}") from None

    def save(self, model, path: Path) -> None:
        # embeddings are never adapted here; "auto" would probe the base model's config.json for a
        # resized vocabulary, which the GGUF default does not have, and warn on every save
        model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)

    def load(self, base, path: Path, trainable: bool = False):
        from peft import PeftConfig, PeftModel

        init = getattr(PeftConfig.from_pretrained(path), "init_lora_weights", None)
        with _same_init_draws(init):  # PiSSA/OLoRA: PEFT derives W0' again before loading B and A
            return PeftModel.from_pretrained(base, path, is_trainable=trainable)

    def merge(self, model):
        return model.merge_and_unload()


register(PeftLora("lora", use_dora=False))
register(PeftLora("dora", use_dora=True))
