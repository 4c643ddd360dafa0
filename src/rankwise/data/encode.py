"""Tokenization with loss on assistant tokens only, and padding into batches."""
from __future__ import annotations

import torch

IGNORE = -100
FALLBACK_ROLES = {"system": "### System\n", "user": "### Prompt\n", "assistant": "### Response\n"}


def _render(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    if tok.chat_template:
        out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)
    text = "".join(FALLBACK_ROLES.get(m["role"], f"### {m['role']}\n") + m["content"] + "\n\n" for m in messages)
    if generation_prompt:
        text += FALLBACK_ROLES["assistant"]
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if not generation_prompt and tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return ids


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of the conversation up to (and asking for) the final assistant turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _render(tok, messages, generation_prompt=True)


def encode(tok, example: dict) -> dict:
    """input_ids and labels (IGNORE outside assistant turns) for one chat example."""
    messages = example["messages"]
    ids = _render(tok, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, messages[:i], generation_prompt=True))
        end = len(_render(tok, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def encode_all(tok, examples: list[dict], max_length: int) -> list[dict]:
    """Encode every example; drop (never truncate) those longer than max_length tokens."""
    out = []
    for ex in examples:
        item = encode(tok, ex)
        if len(item["input_ids"]) <= max_length and any(t != IGNORE for t in item["labels"][1:]):
            out.append(item)
    return out


def collate(items: list[dict], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item, rounded up to `multiple` (fewer distinct shapes to count FLOPs for)."""
    longest = max(len(x["input_ids"]) for x in items)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        ids[row, :n] = torch.tensor(x["input_ids"])
        labels[row, :n] = torch.tensor(x["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
