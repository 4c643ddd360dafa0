"""The tiny-set loss, as cheap as it can be: no autograd, autocast, logits only at labelled tokens."""
from __future__ import annotations

import torch

from rankwise.train.loss import token_loss_sum


def tiny_subset(batches: list[dict], n_examples: int) -> list[dict]:
    """The first `n_examples` rows of `batches`, with padding columns nobody attends to cut off."""
    out, left = [], n_examples
    for batch in batches:
        if left <= 0:
            break
        rows = {k: v[:left] for k, v in batch.items()}
        width = int(rows["attention_mask"].sum(dim=1).max())  # right padding: columns past this are pads
        out.append({k: v[:, :width] for k, v in rows.items()})
        left -= len(rows["input_ids"])
    return out


@torch.no_grad()
def tiny_loss_sum(model, batches: list[dict], autocast) -> tuple[float, int]:
    """(sum of token losses, labelled tokens) over `batches`, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()  # no dropout: the same weights must always give the same loss
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            loss, n = token_loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    return total, count
