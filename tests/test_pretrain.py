"""`rankwise pretrain`: overrides are validated before anything loads, the stdlib split is disjoint,
and a seconds-long run from scratch lowers validation loss, logs JSONL and saves a loadable model."""
from __future__ import annotations

import json

import pytest

from rankwise.config import ConfigError
from rankwise.recipes.pretrain import main, parse_overrides, run, stdlib_files

TINY = ("hidden=32 layers=1 heads=2 kv_heads=1 intermediate=64 vocab=320 corpus_mb=0.3 seq_len=32 batch_size=4 "
        "steps=20 warmup_steps=2 eval_every=10 eval_batches=2 lr=1e-2 progress=false threads=1").split()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain-cache")


def test_bad_overrides_are_refused():
    with pytest.raises(ConfigError, match="unknown pretrain key"):
        parse_overrides(["hiddden=64"])
    with pytest.raises(ConfigError, match="heads"):
        parse_overrides(["hidden=30", "heads=4"])
    with pytest.raises(ConfigError, match="unknown optimizer"):
        parse_overrides(["optimizer=sgdx"])
    with pytest.raises(ConfigError, match="rank"):
        parse_overrides(["optimizer=lorapre", "rank=0"])
    cfg = parse_overrides(["optimizer=galore", "optimizer_args.update_proj_gap=7", "betas=[0.9,0.99]"])
    assert cfg.optimizer_args == {"update_proj_gap": 7} and cfg.betas == (0.9, 0.99)


def test_stdlib_split_is_disjoint_and_holds_real_source():
    train, val, test = stdlib_files()
    assert len(train) > 100 and len(val) > 2 and len(test) > 2
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert any(p.name == "argparse.py" for p in train + val + test)


@pytest.mark.parametrize("optimizer", ["lorapre", "lorapre-muon"])
def test_tiny_pretrain_lowers_validation_loss_and_saves(tmp_path, cache, optimizer):
    out = tmp_path / "run"
    cfg = parse_overrides(TINY + [f"optimizer={optimizer}", "rank=4", f"cache={cache}", f"out={out}"])
    summary = run(cfg, say=lambda *_: None)
    assert summary["val_loss"] < summary["val_loss_start"] - 0.3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in records) == 20
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 10, 20]
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert summary["test_loss"] < summary["val_loss_start"] - 0.3 and summary["test_loss"] != summary["val_loss"]
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg, say=lambda *_: None)


def test_cli_help_lists_keys(capsys):
    assert main(["--help"]) == 0
    assert "optimizer" in capsys.readouterr().out
