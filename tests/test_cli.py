"""The command line: errors are one line and early; generate and merge work on a trained run."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rankwise.cli import main
from rankwise.recipes.train import train


def test_dry_run_prints_config(capsys, tiny_model_dir, tmp_path):
    assert main(["train", "--dry-run", f"model={tiny_model_dir}", f"out={tmp_path / 'o'}", "rank=4"]) == 0
    out = capsys.readouterr().out
    assert "rank: 4" in out and out.strip().endswith("config ok")


@pytest.mark.parametrize("args, message", [
    (["method=nope"], "unknown method 'nope'"),
    (["data=/missing.jsonl"], "dataset not found"),
    (["rank=-1"], "rank must be a positive integer"),
    (["steps=0"], "steps must be positive"),
])
def test_bad_config_is_one_line_exit_2(capsys, tmp_path, args, message):
    assert main(["train", f"out={tmp_path / 'o'}"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rankwise: error: ") and message in err and "\n" not in err


def test_bad_config_fails_fast_in_a_fresh_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rankwise", "train", "method=nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["rankwise: error: unknown method 'nope'; choose one of: "
                                                + proc.stderr.split("choose one of: ")[1].strip()]
    assert "Traceback" not in proc.stderr


def test_malformed_jsonl_reported_with_line(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    code = main(["train", f"model={tiny_model_dir}", f"data={data}", f"out={tmp_path / 'o'}"])
    assert code == 1
    assert f"{data}:2: malformed JSON" in capsys.readouterr().err


def test_generate_and_merge(capsys, tiny_cfg, tiny_model_dir, tmp_path):
    cfg = tiny_cfg(steps=3, lr=1e-2)
    train(cfg, say=lambda *_: None)
    capsys.readouterr()
    assert main(["generate", "def f(x): return x", "--adapter", cfg.out, "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    from rankwise.generate import generate, load_for_inference

    adapted, tok = load_for_inference(None, cfg.out)
    expected = generate(adapted, tok, [{"role": "user", "content": "def f(x): return x"}], max_new_tokens=5)
    assert printed == expected + "\n"  # greedy decoding is deterministic
    merged = tmp_path / "merged"
    assert main(["merge", cfg.out, str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.randint(5, 300, (1, 12))
    torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_generate_missing_adapter(capsys):
    assert main(["generate", "hi", "--adapter", "/no/such/dir"]) == 2
    assert "adapter not found" in capsys.readouterr().err
