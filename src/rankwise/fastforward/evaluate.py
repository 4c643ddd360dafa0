"""The tiny-set loss, as cheap as it can be: no autograd, autocast, logits only at labelled tokens."""
from __future__ import annotations

from rankwise.train.loss import loss_totals, to_device

COLUMNS = ("input_ids", "attention_mask", "labels")


def tiny_subset(batches: list[dict], n_examples: int) -> list[dict]:
    """The first `n_examples` rows of `batches`, with padding columns nobody attends to cut off."""
    out, left = [], n_examples
    for batch in batches:
        if left <= 0:
            break
        rows = {k: batch[k][:left].cpu() for k in COLUMNS}
        width = int(rows["attention_mask"].sum(dim=1).max())  # right padding: columns past this are pads
        out.append(to_device({k: v[:, :width] for k, v in rows.items()}, batch["input_ids"].device))
        left -= len(rows["input_ids"])
    return out


# the loss itself is the recipe's held-out loss: no grad, eval mode, logits only at labelled tokens
tiny_loss_sum = loss_totals
