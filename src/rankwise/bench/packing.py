"""`rankwise bench packing`: the padding share of the training batches, unpacked and packed.

The batches are the ones `rankwise train` would draw (same stream, batch_size, max_length); packing puts
each batch's examples into as few rows of max_length tokens as fit (`packing=true`). Padding share =
padded slots / all slots, over `--batches` batches. No model is loaded (only its tokenizer).
"""
from __future__ import annotations

import argparse
from datetime import date

from rankwise.bench import register, write_json
from rankwise.config import load_config


def padding_shares(cfg, n_batches: int) -> dict:
    from rankwise.data import collate, collate_packed, encode_all, load_splits
    from rankwise.models import load_tokenizer
    from rankwise.train.stream import ExampleStream

    tok = load_tokenizer(cfg.model)
    items = encode_all(tok, load_splits(cfg.data).train, cfg.max_length)
    stream = ExampleStream(len(items), cfg.seed)
    slots = {"unpacked": 0, "packed": 0}
    rows = {"unpacked": 0, "packed": 0}
    tokens = 0
    for _ in range(n_batches):
        chosen = [items[i] for i in stream.take(cfg.batch_size)]
        tokens += sum(len(x["input_ids"]) for x in chosen)
        for name, batch in (("unpacked", collate(chosen, tok.pad_token_id)),
                            ("packed", collate_packed(chosen, tok.pad_token_id, cfg.max_length))):
            slots[name] += batch["input_ids"].numel()
            rows[name] += batch["input_ids"].shape[0]
    return {"tokens": tokens, "slots": slots, "rows_per_batch": {k: v / n_batches for k, v in rows.items()},
            "padding_share": {k: 1 - tokens / v for k, v in slots.items()}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rankwise bench packing", description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40, help="batches to draw (default: the default job's 40 steps)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="train config overrides, e.g. batch_size=64 model=DIR")
    ns = p.parse_args(argv)
    if ns.batches < 1:
        p.error("--batches must be >= 1")
    cfg = load_config(None, list(ns.overrides))
    result = padding_shares(cfg, ns.batches)
    share = result["padding_share"]
    print(f"padding share over {ns.batches} batches of {cfg.batch_size} (max_length {cfg.max_length}): "
          f"unpacked {100 * share['unpacked']:.1f}%, packed {100 * share['packed']:.1f}% "
          f"({result['rows_per_batch']['packed']:.1f} rows per batch instead of {cfg.batch_size})")
    if ns.out:
        write_json(ns.out, {"benchmark": "packing", "date": date.today().isoformat(), "model": cfg.model,
                            "data": cfg.data, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                            "batches": ns.batches, **result})
    return 0


register("packing", main)
