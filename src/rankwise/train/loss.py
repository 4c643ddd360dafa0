"""Causal-LM loss on labelled (response) tokens only, computing logits only where they count.

The LM head of a small model is a large share of its FLOPs (SmolLM2-135M: 576 x 49,152 per token);
prompt tokens need no logits, so we run the decoder, keep the hidden states at labelled positions, and
apply the head there. Falls back to the model's full forward where the head is not a plain Linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rankwise.data import IGNORE


def _split_head(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    plain = isinstance(head, torch.nn.Linear) and decoder is not None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return (decoder, head) if plain and softcap is None else (None, None)


class TokenLoss(torch.nn.Module):
    """The model with its loss as `forward`: the module DDP and FSDP wrap, so every forward (training,
    evaluation, Fast Forward's tiny set) goes through their hooks."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return token_loss_sum(self.model, batch)


def _wraps_token_loss(model) -> bool:
    return isinstance(model, TokenLoss) or isinstance(getattr(model, "module", None), TokenLoss)


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    `model` is a causal LM or a (DDP/FSDP-wrapped) TokenLoss around one."""
    if _wraps_token_loss(model):
        return model(**batch)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    decoder, head = _split_head(model)
    if decoder is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def loss_totals(model, batches: list[dict[str, torch.Tensor]], autocast) -> tuple[float, int]:
    """(sum of token losses, labelled tokens) over `batches` in eval mode (the model's mode is restored)."""
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


def mean_loss(model, batches: list[dict[str, torch.Tensor]], autocast) -> float:
    """Token-weighted mean loss over `batches` in eval mode."""
    total, count = loss_totals(model, batches, autocast)
    return total / max(1, count)
