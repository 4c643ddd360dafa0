"""Examples from the built-in dataset, a local JSONL file, or a local Hugging Face `datasets` directory.

An example is a chat: {"messages": [{"role": ..., "content": ...}, ...]}. JSONL rows may instead hold
{"prompt": ..., "response": ...}, which becomes a user turn and an assistant turn.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from rankwise.config import BUILTIN_DATA, ConfigError

TINY_SIZE = 32  # examples reserved for Fast Forward's tiny held-out set
TEST_MAX = 256
BUILTIN = {BUILTIN_DATA}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and, for JSONL, the line."""


@dataclass
class Splits:
    train: list[dict]
    tiny: list[dict]
    test: list[dict]  # what results are reported on
    validation: list[dict] = field(default_factory=list)  # what settings are chosen on (never the test set)


def check_data(data: str) -> None:
    """Raise ConfigError unless `data` names the built-in set or an existing local file/dataset."""
    if data in BUILTIN:
        return
    path = Path(data)
    try:
        found = path.exists()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise ConfigError(f"dataset path cannot be used: {data} ({e.strerror})") from None
    if not found:
        raise ConfigError(f"dataset not found: {data} (use {BUILTIN_DATA!r}, a .jsonl file or a datasets directory)")
    if path.is_file() and path.suffix not in (".jsonl", ".json"):
        raise ConfigError(f"dataset file must be .jsonl, got {data}")


def as_chat(row: object, where: str) -> dict:
    """Normalise one row to {"messages": [...]}, or raise DataError naming `where`."""
    chat = _as_chat(row, where)
    for m in chat["messages"]:
        try:
            m["role"].encode("utf-8"), m["content"].encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell one (\ud800); no tokenizer can encode it
            raise DataError(f"{where}: text holds an unpaired surrogate, which is not valid Unicode") from None
    return chat


def _as_chat(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
        if msgs[0]["role"] == "assistant":  # the chat template cannot render the empty prompt before it
            raise DataError(f"{where}: 'messages' starts with an assistant turn; put the prompt before it")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    if "prompt" in row and "response" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["response"], str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["response"]}]}
    raise DataError(f"{where}: expected keys 'prompt' and 'response', or 'messages'; got {sorted(row)}")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open("rb") as f:  # bytes, so that a decoding error can name its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading BOM is not data
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            rows.append(as_chat(row, f"{path}:{n}"))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _read_datasets_dir(path: Path) -> list[dict] | dict[str, list[dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for "not a saved dataset"
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        return {name: [as_chat(r, f"{path}[{name}][{i}]") for i, r in enumerate(split)] for name, split in ds.items()}
    return [as_chat(r, f"{path}[{i}]") for i, r in enumerate(ds)]


def _key(example: dict) -> str:
    return hashlib.sha1(json.dumps(example, sort_keys=True).encode()).hexdigest()


def split(examples: list[dict], test_size: int | None = None) -> Splits:
    """Deterministic split by content hash: independent of file order, stable across machines."""
    ordered = sorted(examples, key=_key)
    n = len(ordered)
    test_size = test_size if test_size is not None else min(TEST_MAX, max(1, n // 10))
    tiny_size = min(TINY_SIZE, max(1, n // 10))
    if n < test_size + tiny_size + 1:
        raise DataError(f"only {n} examples: need at least {test_size + tiny_size + 1} (test, tiny and train)")
    # validation: the last quarter of the held-out block, so train and tiny stay as they were and the test
    # set keeps its first examples (every evaluation reads a prefix of it)
    kept = test_size - test_size // 4
    return Splits(test=ordered[:kept], validation=ordered[kept:test_size],
                  tiny=ordered[test_size:test_size + tiny_size], train=ordered[test_size + tiny_size:])


def load_splits(data: str) -> Splits:
    """Train / tiny / test examples for `data` (see module docstring)."""
    check_data(data)
    if data == BUILTIN_DATA:
        from rankwise.data.stdlib_docstrings import extract

        return split([as_chat(p, "stdlib") for p in extract()])
    path = Path(data)
    if path.is_file():
        return split(read_jsonl(path))
    loaded = _read_datasets_dir(path)
    if isinstance(loaded, dict):
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict needs a 'train' split, has {sorted(loaded)}")
        held = loaded.get("test") or loaded.get("validation")
        if held is None:
            return split(loaded["train"])
        rest = sorted(loaded["train"], key=_key)
        tiny = min(TINY_SIZE, max(1, len(rest) // 10))
        # a lone held-out split stays the test set, whole; then there is no validation split
        validation = loaded.get("validation", []) if "test" in loaded else []
        return Splits(train=rest[tiny:], tiny=rest[:tiny], test=held, validation=validation)
    return split(loaded)
