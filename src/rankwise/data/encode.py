"""Tokenization with loss on assistant tokens only, and padding into batches.

A conversation is rendered to text once with the tokenizer's chat template; the character spans of
assistant turns become labels through the fast tokenizer's offset mapping, so whole datasets are
tokenized in one batched call.
"""
from __future__ import annotations

import torch

IGNORE = -100
FALLBACK_ROLES = {"system": "### System\n", "user": "### Prompt\n", "assistant": "### Response\n"}


def render(tok, messages: list[dict], generation_prompt: bool) -> str:
    """The conversation as the model sees it (chat template, or a plain fallback format)."""
    if tok.chat_template:
        return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    text = (tok.bos_token or "") + "".join(
        FALLBACK_ROLES.get(m["role"], f"### {m['role']}\n") + m["content"] + "\n\n" for m in messages)
    if generation_prompt:
        return text + FALLBACK_ROLES["assistant"]
    return text + (tok.eos_token or "")


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the [start, end) character spans of each assistant turn in it."""
    full = render(tok, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(tok, messages[:i], generation_prompt=True))
            end = len(render(tok, messages[: i + 1], generation_prompt=False))
            spans.append((start, end))
    return full, spans


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of the conversation up to (and asking for) the final assistant turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tok(render(tok, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]


def encode_all(tok, examples: list[dict], max_length: int) -> list[dict]:
    """input_ids and labels (IGNORE outside assistant turns) per example, in one batched tokenizer call.

    Examples longer than max_length tokens, or with nothing left to learn, are dropped (never truncated).
    """
    if not examples:
        return []
    rendered = [assistant_spans(tok, ex["messages"]) for ex in examples]
    enc = tok([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        labels = [tid if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE
                  for tid, (a, b) in zip(ids, offsets)]
        if len(ids) <= max_length and any(t != IGNORE for t in labels[1:]):
            out.append({"input_ids": list(ids), "labels": labels})
    return out


def encode(tok, example: dict) -> dict:
    """input_ids and labels for one example (no length limit)."""
    return encode_all(tok, [example], max_length=1 << 30)[0]


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


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Item indices grouped into rows of at most `capacity` tokens: first-fit, longest first (ties by index)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"an item of {lengths[i]} tokens does not fit a row of {capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate_packed(items: list[dict], pad_id: int, capacity: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """The same items as `collate`, packed several to a row (see `pack`) with `position_ids` restarting at 0
    for each; a model given position_ids and no attention mask keeps them from attending to one another
    (transformers' packed-sequence masks). Each item's first label is dropped, as unpacked (nothing
    predicts it); the padding at a row's end is a segment of its own. attention_mask marks real tokens,
    for counting only."""
    rows = pack([len(x["input_ids"]) for x in items], capacity)
    longest = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            x = items[i]
            n = len(x["input_ids"])
            ids[r, start:start + n] = torch.tensor(x["input_ids"])
            labels[r, start + 1:start + n] = torch.tensor(x["labels"][1:])
            mask[r, start:start + n] = 1
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}
