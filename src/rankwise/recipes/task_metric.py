"""A task metric beside the held-out loss: generate the reply to held-out prompts, score it against the reference.

ROUGE-L F1 (Lin, 2004) over lower-cased word tokens: the longest common subsequence of prediction and
reference, as a share of each (precision, recall), combined by their harmonic mean. On the built-in data
the reply is a docstring, so this asks "does the adapter write the docstring the author wrote?".
"""
from __future__ import annotations

import re

MAX_NEW_TOKENS = 64  # a docstring's summary and a line or two; greedy decoding stops earlier at EOS

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the dynamic programme at a time."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]; 0 when either side has no words."""
    p, r = words(prediction), words(reference)
    common = lcs_length(p, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(model, tok, examples: list[dict], autocast=None, batch_size: int = 8, progress=None) -> float:
    """Mean ROUGE-L F1 of greedy replies to `examples` (chat rows whose last message is the reference),
    generated `batch_size` prompts at a time; `progress(n)` is told after each batch."""
    from rankwise.generate import generate_batch

    scores = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        replies = generate_batch(model, tok, [ex["messages"][:-1] for ex in chunk], MAX_NEW_TOKENS, autocast)
        scores += [rouge_l(reply, ex["messages"][-1]["content"]) for reply, ex in zip(replies, chunk)]
        if progress:
            progress(len(chunk))
    return sum(scores) / len(scores)
