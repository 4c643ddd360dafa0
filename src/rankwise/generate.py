"""Text generation and merging with a trained artifact (any registered method)."""
from __future__ import annotations

from pathlib import Path

import torch

from rankwise.config import ConfigError
from rankwise.data import prompt_ids
from rankwise.methods import get_method
from rankwise.models import load_model, load_tokenizer
from rankwise.train.checkpoint import ADAPTER, META, read_meta, resolve


def locate_artifact(path: str) -> tuple[Path, dict]:
    """(adapter directory, metadata) for a run directory, a checkpoint, or a bare PEFT adapter directory."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"adapter not found: {path}")
    if (p / "adapter_config.json").is_file():  # a plain PEFT adapter, e.g. from another tool
        meta = read_meta(p.parent) if (p.parent / META).is_file() else {"method": "lora"}
        return p, meta
    try:
        ckpt = resolve(str(p), p)
    except FileNotFoundError:
        raise ConfigError(f"{path} holds no rankwise checkpoint or PEFT adapter") from None
    return ckpt / ADAPTER, read_meta(ckpt)


def load_for_inference(model: str | None, adapter: str | None):
    """(model, tokenizer): a base model, with an adapter applied when given. `model` defaults to the
    adapter's own base model."""
    meta = {}
    if adapter:
        adapter_dir, meta = locate_artifact(adapter)
    name = model or meta.get("model", "default")
    tok = load_tokenizer(name)
    net = load_model(name)
    if adapter:
        net = get_method(meta["method"]).load(net, adapter_dir, trainable=False)
    net.eval()
    return net, tok


def generate(model, tok, messages: list[dict], max_new_tokens: int = 64, autocast=None) -> str:
    """Greedy continuation of a chat; returns only the new text."""
    return generate_batch(model, tok, [messages], max_new_tokens, autocast)[0]


@torch.no_grad()
def generate_batch(model, tok, chats: list[list[dict]], max_new_tokens: int = 64, autocast=None) -> list[str]:
    """Greedy continuations of several chats at once (prompts left-padded); returns each one's new text."""
    prompts = [prompt_ids(tok, messages) for messages in chats]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=tok.pad_token_id)
    model.train(was_training)
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def merge(adapter: str, out: str, model: str | None = None) -> Path:
    """Fold the adapter into its base model and save a plain transformers model directory at `out`."""
    adapter_dir, meta = locate_artifact(adapter)
    method = get_method(meta["method"])
    if not method.mergeable:
        method.merge(None)  # raises the method's own explanation, before any weights load
    net, tok = load_for_inference(model, adapter)
    merged = method.merge(net)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest
