"""Full fine-tuning: every weight trains; the artifact is the whole model's safetensors."""
from __future__ import annotations

from pathlib import Path

from rankwise.methods import Method, register

WEIGHTS = "model.safetensors"


class Full(Method):
    name = "full"
    mergeable = True
    update = "full"
    fsdp = True
    low_rank = False

    def adapt(self, model, spec):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def load(self, base, path: Path, trainable: bool = False):
        from safetensors.torch import load_file

        state = {}
        for shard in sorted(path.glob("*.safetensors")):
            state.update(load_file(shard))
        missing, unexpected = base.load_state_dict(state, strict=False)
        # tied embeddings are saved once; anything else missing means a wrong directory
        missing = [k for k in missing if k not in _tied_keys(base)]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the base model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        for p in base.parameters():
            p.requires_grad_(trainable)
        return base

    def merge(self, model):
        return model


def _tied_keys(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


register(Full())
