"""Causal-LM loss on labelled (response) tokens only, computing logits only where they count.

The LM head of a small model is a large share of its FLOPs (SmolLM2-135M: 576 x 49,152 per token);
prompt tokens need no logits, so we run the decoder, keep the hidden states at labelled positions, and
apply the head there. Falls back to the model's full forward where the head is not a plain Linear.

`to_device` prepares a collated batch for the hot loop: the labelled positions are found on the host,
where the labels were built, so the loss needs no boolean-mask indexing (a host-device sync) and the
step knows its token counts without asking the device.
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


def to_device(batch: dict[str, torch.Tensor], device) -> dict:
    """A collated (CPU) batch on `device`, plus what the loss and the loop need without a device sync:
    `label_index` (flat positions in (B, T) whose next token is labelled), `targets` (those tokens),
    `n_labelled` and `n_tokens` (Python ints). Copies are asynchronous from pinned memory on CUDA."""
    label_index, targets = _labelled(batch["labels"])
    host = {**batch, "label_index": label_index, "targets": targets}
    pin = torch.device(device).type == "cuda"
    out = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in host.items()}
    out["n_labelled"], out["n_tokens"] = int(label_index.numel()), int(batch["attention_mask"].sum())
    return out


class TokenLoss(torch.nn.Module):
    """The model with its loss as `forward`: the module DDP and FSDP wrap, so every forward (training,
    evaluation, Fast Forward's tiny set) goes through their hooks."""

    def __init__(self, model, compile: bool = False):
        super().__init__()
        self.model = model
        decoder, _ = _split_head(model)
        if compile and decoder is None:
            raise ValueError("compile=true needs a model with a decoder and a plain Linear head")
        # kept off the module tree (a plain attribute would register the decoder's parameters twice)
        self.__dict__["compiled_decoder"] = torch.compile(decoder) if compile else None

    def forward(self, input_ids, attention_mask, labels, **prepared):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **prepared}
        return token_loss_sum(self.model, batch, decoder=self.compiled_decoder)


def _wraps_token_loss(model) -> bool:
    return isinstance(model, TokenLoss) or isinstance(getattr(model, "module", None), TokenLoss)


def token_loss_sum(model, batch: dict[str, torch.Tensor], decoder=None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    `model` is a causal LM or a (DDP/FSDP-wrapped) TokenLoss around one. A batch from `to_device` costs no
    host-device sync; a plain collated one finds its labelled positions with a boolean mask (one sync).
    `decoder`: a compiled stand-in for the model's own decoder."""
    if _wraps_token_loss(model):
        return model(**batch)
    if "label_index" in batch:
        index, targets, count = batch["label_index"], batch["targets"], batch["n_labelled"]
    else:
        index, targets = _labelled(batch["labels"])
        count = int(index.numel())
    if "position_ids" in batch:  # packed rows: no mask, so the model builds block-diagonal attention
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs["use_cache"] = False  # a loss needs no KV cache (and a cache would turn packed masks off)
    plain_decoder, head = _split_head(model)
    decoder = plain_decoder if decoder is None else decoder
    if decoder is not None:
        hidden = decoder(**inputs).last_hidden_state
        logits = head(_rows(hidden, index))
    else:
        logits = _rows(model(**inputs).logits, index)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, count


def _labelled(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions p of (B, T) whose next token is labelled, and those next tokens, row-major."""
    following = torch.full_like(labels, IGNORE)
    following[:, :-1] = labels[:, 1:]
    following = following.reshape(-1)
    index = (following != IGNORE).nonzero().squeeze(1)
    return index, following[index]


def _rows(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of the (B, T, H) states flattened to (B·T, H)."""
    return states.reshape(-1, states.shape[-1]).index_select(0, index)


@torch.no_grad()
def loss_totals(model, batches: list[dict[str, torch.Tensor]], autocast) -> tuple[float, int]:
    """(sum of token losses, labelled tokens) over `batches` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()  # no dropout: the same weights must always give the same loss
    losses, count = [], 0
    for batch in batches:
        with autocast():
            loss, n = token_loss_sum(model, batch)
        losses.append(loss.double())
        count += n
    model.train(was_training)
    return float(torch.stack(losses).sum()) if losses else 0.0, count  # one sync for the whole set


def mean_loss(model, batches: list[dict[str, torch.Tensor]], autocast) -> float:
    """Token-weighted mean loss over `batches` in eval mode."""
    total, count = loss_totals(model, batches, autocast)
    return total / max(1, count)
