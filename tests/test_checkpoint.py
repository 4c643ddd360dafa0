"""Checkpoints are atomic: an interrupted save never damages the previous checkpoint."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rankwise.train import checkpoint as ckpt
from rankwise.train.metrics import read_metrics


def _write(path, value):
    (path / "w.txt").write_text(value)


def test_save_then_resolve(tmp_path):
    saved = ckpt.save_checkpoint(tmp_path, 5, lambda p: _write(p, "five"), {"x": torch.ones(2)}, {"method": "lora"})
    assert ckpt.resolve("latest", tmp_path) == saved
    assert ckpt.resolve(str(tmp_path), tmp_path) == saved
    assert ckpt.read_meta(saved)["step"] == 5


def test_interrupted_save_keeps_previous(tmp_path):
    good = ckpt.save_checkpoint(tmp_path, 1, lambda p: _write(p, "one"), {}, {"method": "lora"})

    def dies_halfway(p):
        (p / "partial.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing the adapter

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, dies_halfway, {}, {"method": "lora"})
    assert ckpt.resolve("latest", tmp_path) == good
    assert (good / "adapter" / "w.txt").read_text() == "one"
    assert not (tmp_path / "checkpoints" / "step-000002").exists()
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


def test_keeps_only_newest(tmp_path):
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, lambda p: _write(p, "s"), {}, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000004"]


def test_resave_same_step_replaces(tmp_path):
    ckpt.save_checkpoint(tmp_path, 3, lambda p: _write(p, "old"), {}, {})
    again = ckpt.save_checkpoint(tmp_path, 3, lambda p: _write(p, "new"), {}, {})
    assert (again / "adapter" / "w.txt").read_text() == "new"


def test_sigterm_saves_and_resume_finishes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "rankwise", "train", f"model={tiny_model_dir}", "batch_size=2", "lr=1e-3",
            "eval_every=0", "sample=false", "precision=fp32", "max_length=256", f"out={out}"]
    proc = subprocess.Popen(args + ["steps=400"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum(r["kind"] == "train" for r in read_metrics(metrics)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "stopped by SIGTERM" in output
    stopped_at = ckpt.read_meta(ckpt.resolve("latest", out))["step"]
    assert 3 <= stopped_at < 400
    done = subprocess.run(args + ["resume=latest", f"steps={stopped_at + 2}"],
                          capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ckpt.read_meta(ckpt.resolve("latest", out))["step"] == stopped_at + 2


class _Payload:
    """Unpickling this calls a function: what a tampered state.pt would carry."""

    def __reduce__(self):
        return (_touch, ("/tmp/rankwise-pickle-ran",))


def _touch(path):
    Path(path).write_text("ran")


def test_state_with_a_pickle_payload_is_refused_without_running_it(tiny_cfg, tmp_path):
    from rankwise.recipes.train import CheckpointError, train

    cfg = tiny_cfg(out=str(tmp_path / "run"), steps=2, eval_every=0)
    summary = train(cfg, say=lambda *_: None)
    state_file = Path(summary["checkpoint"]) / "state.pt"
    state = torch.load(state_file, weights_only=True)  # a genuine state needs no code to load
    state["hooks_extra"] = _Payload()
    torch.save(state, state_file)
    marker = Path("/tmp/rankwise-pickle-ran")
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="refusing the state.pt"):
        train(tiny_cfg(out=str(tmp_path / "run"), steps=4, eval_every=0, resume="latest"), say=lambda *_: None)
    assert not marker.exists()


@pytest.mark.parametrize("method,optimizer", [("full", "galore"), ("full", "lorapre"), ("lora", "loft"),
                                              ("lora", "adamw")])
def test_every_optimizers_state_loads_without_unpickling_code(tiny_cfg, tmp_path, method, optimizer):
    from rankwise.recipes.train import train

    common = dict(method=method, optimizer=optimizer, eval_every=0, save_every=2, out=str(tmp_path / "run"))
    if optimizer == "galore":
        common["optimizer_args.update_proj_gap"] = 2
    train(tiny_cfg(steps=2, **common), say=lambda *_: None)
    state = ckpt.load_state(tmp_path / "run/checkpoints/step-000002/state.pt")
    assert state["step"] == 2 and state["optimizer"]["state"]
    summary = train(tiny_cfg(steps=3, resume="latest", **common), say=lambda *_: None)
    assert summary["step"] == 3
