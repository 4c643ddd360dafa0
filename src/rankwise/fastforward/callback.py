"""Fast Forward for transformers.Trainer and TRL's SFTTrainer, in one line:

    trainer.add_callback(FastForwardCallback(tiny_rows, interval=6))

`tiny_rows` are tokenized examples (dicts with input_ids and labels, as the training set holds), which
the trainer's own data collator batches; or pass `tiny_loss=fn(model) -> float` instead. Stages run in
`on_step_end`, i.e. after the optimizer and LR-scheduler steps; the schedule is not advanced by FF.
The component's state is saved beside each checkpoint (fast_forward.pt) and restored on resume.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import TrainerCallback

from rankwise.fastforward.core import FastForward, FFOptions
from rankwise.train.checkpoint import load_state

STATE_FILE = "fast_forward.pt"
MODEL_KEYS = ("input_ids", "attention_mask", "labels")


class FastForwardCallback(TrainerCallback):
    def __init__(self, tiny_rows=None, tiny_loss=None, batch_size: int = 8, **options):
        if (tiny_rows is None) == (tiny_loss is None):
            raise ValueError("pass exactly one of tiny_rows (tokenized examples) or tiny_loss (fn(model) -> float)")
        self.options = FFOptions(**options)
        self.tiny_rows = None if tiny_rows is None else [
            {k: v for k, v in row.items() if k in MODEL_KEYS} for row in list(tiny_rows)[:self.options.tiny_examples]]
        self.user_loss = tiny_loss
        self.batch_size = batch_size
        self.ff: FastForward | None = None
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        collate = getattr(train_dataloader, "collate_fn", None)
        batches = None
        if self.tiny_rows is not None:
            if collate is None:
                raise ValueError("FastForwardCallback: no data collator to batch tiny_rows; pass tiny_loss instead")
            batches = [collate(self.tiny_rows[i:i + self.batch_size])
                       for i in range(0, len(self.tiny_rows), self.batch_size)]
        autocast = (lambda: torch.autocast(model.device.type, dtype=torch.bfloat16)) if args.bf16 else \
            (lambda: torch.autocast(model.device.type, dtype=torch.float16)) if args.fp16 else contextlib.nullcontext

        def tiny_loss():
            if self.user_loss is not None:
                return self.user_loss(model)
            return _loss_sum(model, batches, autocast)

        self.ff = FastForward([p for p in model.parameters() if p.requires_grad], tiny_loss, self.options)
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if state.global_step > 0 and saved.is_file():  # resuming: continue the stages exactly
            self.ff.load_state_dict(load_state(saved))
        elif state.global_step > 0:
            self.ff.step = state.global_step
            self.ff.next_stage = max(self.ff.next_stage, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        stage = self.ff.after_step()
        if stage is not None:
            record = {"step": state.global_step, **{k: stage[k] for k in
                                                    ("accepted", "loss_before", "loss_after", "evals", "interval")}}
            self.records.append(record)
            state.log_history.append({f"ff_{k}" if k != "step" else k: v for k, v in record.items()})

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and args.process_index == 0:
            torch.save(self.ff.state_dict(), folder / STATE_FILE)


@torch.no_grad()
def _loss_sum(model, batches, autocast) -> tuple[float, int]:
    """(sum of token losses, labelled tokens) in eval mode; transformers' loss is a mean over the batch."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items() if k in MODEL_KEYS}
        n = int((batch["labels"][:, 1:] != -100).sum())
        with autocast():
            total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total, count
