"""FFBA as a rankwise method: trains unfused, loads fused for inference, cannot be merged."""
from __future__ import annotations

import json
from pathlib import Path

from rankwise.config import DEFAULT_MODEL, Config, ConfigError
from rankwise.methods import Method, register

OPTIONS = ("blocks", "activation")


def settings_from(cfg: Config):
    """The adapter Settings a run config asks for (method_args.blocks, method_args.activation)."""
    from rankwise.ffba.settings import BLOCKS, Settings

    unknown = set(cfg.method_args) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"method 'ffba' does not take method_args {sorted(unknown)}; it takes {list(OPTIONS)}")
    blocks = cfg.method_args.get("blocks", list(BLOCKS))
    if isinstance(blocks, str):
        blocks = [b.strip() for b in blocks.split(",") if b.strip()]
    if not isinstance(blocks, list):
        raise ConfigError(f"ffba: method_args.blocks must be a list such as [attn,mlp], got {blocks!r}")
    return Settings(rank=cfg.rank, alpha=cfg.alpha, blocks=tuple(str(b) for b in blocks),
                    activation=str(cfg.method_args.get("activation", "identity")), dropout=cfg.dropout).check()


def check_model_dir(name: str) -> None:
    """Refuse an unsupported architecture from config.json, before any weights load."""
    from rankwise.ffba.inject import check_architecture

    if name == DEFAULT_MODEL:
        return  # the embedded SmolLM2 is a Llama
    config = Path(name) / "config.json"
    try:
        if not config.is_file():
            return  # the model check reports a missing directory or config itself
        raw = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return
    check_architecture(raw.get("model_type"), raw.get("architectures"), where=name)


class FFBA(Method):
    name = "ffba"
    mergeable = False

    def check(self, cfg: Config) -> None:
        settings_from(cfg)
        if cfg.target_modules != "all-linear":
            raise ConfigError("ffba adapts whole sub-blocks, not linear layers: drop target_modules and choose "
                              "method_args.blocks=[attn,mlp] (or one of them)")
        check_model_dir(cfg.model)

    def apply(self, model, cfg: Config):
        from rankwise.ffba.inject import inject

        model = inject(model, settings_from(cfg))
        model.ffba_settings = settings_from(cfg)
        return model

    def save(self, model, path: Path) -> None:
        from rankwise.ffba import io

        io.save(model, model.ffba_settings, path)

    def load(self, base, path: Path, trainable: bool = False):
        """Unfused with trainable adapters when `trainable`, else the fused inference form."""
        from rankwise.ffba import io
        from rankwise.ffba.inject import adapters, fuse

        model, settings = io.load(base, Path(path))
        model.ffba_settings = settings
        if not trainable:
            return fuse(model).eval()
        for adapter in adapters(model).values():
            adapter.requires_grad_(True)
        return model

    def merge(self, model):
        raise ConfigError("ffba cannot be merged into the base weights: its up-projection B acts on the "
                          "sub-block's input, not on a weight's input, so no W' = W + ΔW exists; use the "
                          "fused form (`rankwise generate --adapter ...` loads it)")


register(FFBA())
