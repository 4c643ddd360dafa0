"""FFBA as a rankwise method: trains unfused, loads fused for inference, cannot be merged."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rankwise.config import DEFAULT_MODEL, Config, ConfigError
from rankwise.methods import Method, MethodSpec, register


@dataclass(frozen=True)
class FFBAOptions:
    blocks: tuple[str, ...] | list[str] | str | None = None  # sub-blocks to adapt: [attn,mlp] (default both)
    activation: str = "identity"
    adapters: str = "forward"  # forward (parallel, inside each sub-block) | backward (across the junction) | both
    split: float | None = None  # adapters=both: fraction of the rank for the backward adapters (default 0.5)
    reads: str = "hidden"  # backward adapters read the output projection's input (hidden) or the normed x (normed)

    def __post_init__(self):
        from rankwise.ffba.settings import BLOCKS

        blocks = BLOCKS if self.blocks is None else self.blocks
        if isinstance(blocks, str):
            blocks = [b.strip() for b in blocks.split(",") if b.strip()]
        if not isinstance(blocks, (list, tuple)):
            raise ValueError(f"ffba: method_args.blocks must be a list such as [attn,mlp], got {blocks!r}")
        object.__setattr__(self, "blocks", tuple(str(b) for b in blocks))

    def settings(self, spec: MethodSpec):
        """The adapter Settings these options and the spec describe (`.check()` them once, in validation)."""
        from rankwise.ffba.settings import Settings

        return Settings(rank=spec.rank, alpha=spec.alpha, blocks=self.blocks, activation=str(self.activation),
                        dropout=spec.dropout, adapters=str(self.adapters), split=self.split,
                        reads=str(self.reads))


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
    Options = FFBAOptions
    update = "ffba"
    fsdp = True
    low_rank = False  # Settings.check says "ffba: rank ..." itself

    def check(self, spec: MethodSpec, cfg: Config) -> None:
        spec.options.settings(spec).check()
        if spec.target_modules != "all-linear":
            raise ValueError("ffba adapts whole sub-blocks, not linear layers: drop target_modules and choose "
                             "method_args.blocks=[attn,mlp] (or one of them)")
        check_model_dir(cfg.model)
        if cfg.parallel == "fsdp" and spec.options.adapters != "forward":
            # z crosses from one decoder layer to the next outside the layer outputs FSDP2 hooks into
            raise ValueError("ffba: parallel=fsdp trains only adapters=forward; use parallel=ddp for backward adapters")

    def adapt(self, model, spec: MethodSpec):
        from rankwise.ffba.inject import inject

        settings = spec.options.settings(spec)
        model = inject(model, settings)
        model.ffba_settings = settings
        return model

    def save(self, model, path: Path) -> None:
        from rankwise.ffba import io

        io.save(model, model.ffba_settings, path)

    def load(self, base, path: Path, trainable: bool = False):
        """Unfused with trainable adapters when `trainable`, else the fused inference form."""
        from rankwise.ffba import io
        from rankwise.ffba.inject import adapters, fuse, junctions

        model, settings = io.load(base, Path(path))
        model.ffba_settings = settings
        if not trainable:
            return fuse(model).eval()
        for adapter in adapters(model).values():
            adapter.requires_grad_(True)
        for junction in junctions(model).values():
            for p in junction.parameters():
                p.requires_grad_(True)
        return model

    def merge(self, model):
        raise ConfigError("ffba cannot be merged into the base weights: its up-projection B acts on the "
                          "sub-block's input (forward) or on the previous sub-block's (backward), not on a "
                          "weight's input, so no W' = W + ΔW exists; use the "
                          "fused form (`rankwise generate --adapter ...` loads it)")


register(FFBA())
