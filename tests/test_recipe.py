"""The training recipe end to end on a tiny random Llama: learning, artifacts, exact resume."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rankwise.data import collate, encode_all, load_splits
from rankwise.train.loss import token_loss_sum
from rankwise.train.metrics import read_metrics
from rankwise.recipes.train import TrainingDiverged, train


def _adapter_tensors(ckpt):
    return load_file(f"{ckpt}/adapter/adapter_model.safetensors")


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_held_out_loss_falls(tiny_cfg, method):
    lr = 1e-3 if method == "full" else 1e-2
    summary = train(tiny_cfg(method=method, steps=12, lr=lr, schedule="constant"), say=lambda *_: None)
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.05
    assert summary["cum_flops"] > 0


def test_logs_plot_and_flops(tiny_cfg):
    cfg = tiny_cfg()
    train(cfg, say=lambda *_: None)
    records = read_metrics(f"{cfg.out}/metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, cfg.steps + 1))
    assert all(r["flops"] > 0 and r["tok_s"] > 0 for r in steps)
    assert len([r for r in records if r["kind"] == "eval"]) == 3  # start, step 3, end
    png = open(f"{cfg.out}/loss.png", "rb").read()
    assert png.startswith(b"\x89PNG")


def test_loss_equals_transformers_loss(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    items = encode_all(tok, load_splits("stdlib-docstrings").test[:4], 1000)
    batch = collate(items, tok.pad_token_id)
    ours, n = token_loss_sum(model, batch)
    theirs = model(**batch).loss  # mean over labelled next tokens
    torch.testing.assert_close(ours / n, theirs, rtol=1e-5, atol=1e-6)


def test_peft_round_trip_same_logits(tiny_cfg, tiny_model_dir):
    cfg = tiny_cfg(steps=3)
    summary = train(cfg, say=lambda *_: None)
    adapter = f"{summary['checkpoint']}/adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(5, 300, (2, 17))
    plain = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    adapted = peft_model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter trained to something non-zero

    from rankwise.generate import load_for_inference

    ours, _ = load_for_inference(None, cfg.out)
    torch.testing.assert_close(ours(input_ids=ids).logits, adapted)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_equals_uninterrupted(tiny_cfg, tmp_path, method):
    common = dict(method=method, steps=6, dropout=0.1 if method == "lora" else 0.0, lr=3e-3, save_every=3)
    whole = train(tiny_cfg(out=str(tmp_path / "whole"), **common), say=lambda *_: None)
    # a second run restarted from its step-3 checkpoint must retrace steps 4..6 exactly
    split_out = tmp_path / "split"
    train(tiny_cfg(out=str(split_out), **common), say=lambda *_: None)
    resumed = train(tiny_cfg(out=str(split_out), resume=str(split_out / "checkpoints/step-000003"), **common),
                    say=lambda *_: None)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a = load_file(f"{whole['checkpoint']}/adapter/{name}")
    b = load_file(f"{resumed['checkpoint']}/adapter/{name}")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-7)
    steps = [r["step"] for r in read_metrics(split_out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log was cut back to the checkpoint, not duplicated


def test_nan_loss_stops_with_clear_error(tiny_cfg, monkeypatch):
    import rankwise.recipes.train as recipe

    calls = {"n": 0}
    real = recipe.token_loss_sum

    def poisoned(model, batch):  # the 4th micro-batch yields a NaN loss
        loss, n = real(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), n

    monkeypatch.setattr(recipe, "token_loss_sum", poisoned)
    cfg = tiny_cfg(steps=6, save_every=2)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4"):
        train(cfg, say=lambda *_: None)
    latest = open(f"{cfg.out}/latest").read().strip()
    assert latest.endswith("step-000002")
    meta = json.loads(open(f"{cfg.out}/{latest}/rankwise.json").read())
    assert meta["step"] == 2  # the last good checkpoint is kept


def test_grad_accumulation_equals_one_big_batch(tiny_cfg, tmp_path):
    from rankwise.recipes.train import build_run, train_step

    def one_step(**overrides):
        run = build_run(tiny_cfg(out=str(tmp_path / str(overrides)), steps=1, warmup_steps=0, **overrides),
                        say=lambda *_: None)
        train_step(run)
        run.log_file.close()
        return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}

    # the stream hands out the same 4 examples either way; the loss is token-weighted over all of them
    big, split = one_step(batch_size=4, grad_accum=1), one_step(batch_size=2, grad_accum=2)
    for name in big:
        torch.testing.assert_close(split[name], big[name], rtol=1e-5, atol=1e-6)


def test_compile_trains_like_eager(tiny_cfg, tmp_path):
    """compile=true (torch.compile of the decoder, inductor's C++ on CPU) follows the eager run's losses."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        train(tiny_cfg(out=str(out), steps=4, eval_every=0, compile=compiled, count_flops=False), say=lambda *_: None)
        runs[compiled] = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] in ("train", "eval")]
    eager, compiled = runs[False], runs[True]
    assert [r["kind"] for r in eager] == [r["kind"] for r in compiled]
    for a, b in zip(eager, compiled):
        key = "loss" if a["kind"] == "train" else "eval_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_per_token_loss(tiny_model_dir, attention):
    from rankwise.data import collate_packed, load_splits
    from rankwise.train.loss import to_device

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    items = encode_all(tok, load_splits("stdlib-docstrings").train[:12], 256)
    plain = to_device(collate(items, tok.pad_token_id), "cpu")
    packed = to_device(collate_packed(items, tok.pad_token_id, capacity=256), "cpu")
    assert packed["input_ids"].numel() < plain["input_ids"].numel()  # it packed something
    with torch.no_grad():
        ours, n = token_loss_sum(model, packed)
        theirs, m = token_loss_sum(model, plain)
    assert n == m
    assert float(ours) / n == pytest.approx(float(theirs) / m, abs=1e-4)


def test_training_with_packing_logs_less_padding(tiny_cfg, tmp_path):
    shares = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        train(tiny_cfg(out=str(out), steps=3, eval_every=0, batch_size=8, packing=packing), say=lambda *_: None)
        shares[packing] = [r["padding"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert all(p < u for p, u in zip(shares[True], shares[False])), shares


def test_validation_loss_is_scored_on_the_validation_split(tiny_cfg):
    """validation_examples=N scores the first N validation examples at the end: the same number a
    hand-computed mean over those examples gives, and not the test loss."""
    import contextlib

    from rankwise.generate import load_for_inference
    from rankwise.train.loss import TokenLoss, mean_loss, to_device

    cfg = tiny_cfg(steps=2, eval_every=0, validation_examples=8)
    summary = train(cfg, say=lambda *a: None)
    model, tok = load_for_inference(cfg.model, summary["checkpoint"])
    items = encode_all(tok, load_splits(cfg.data).validation[:8], cfg.max_length)
    batches = [to_device(collate(items[i:i + cfg.batch_size], tok.pad_token_id), torch.device("cpu"))
               for i in range(0, len(items), cfg.batch_size)]
    expected = mean_loss(TokenLoss(model), batches, contextlib.nullcontext)
    assert summary["validation_loss"] == pytest.approx(expected, rel=1e-5)
    assert summary["validation_loss"] != pytest.approx(summary["eval_loss"], rel=1e-6)
