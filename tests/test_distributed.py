"""Scale-out on CPU: torchrun, gloo, 2 processes, the tiny model.

A 2-process run equals a 1-process run with the same global batch; every rank holds the same weights;
a stopped 2-process run resumes to exactly the uninterrupted result; a SIGKILLed worker leaves the last
checkpoint intact; `rankwise train nproc=2` re-launches under torchrun and passes SIGTERM on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.train.metrics import read_metrics

WORKER = Path(__file__).parent / "dist" / "worker.py"
TIMEOUT = 300


def _base(tiny_model_dir, out, **overrides) -> list[str]:
    args = {"model": tiny_model_dir, "steps": 3, "eval_examples": 8, "eval_every": 0, "lr": 3e-3, "rank": 4,
            "alpha": 8, "sample": "false", "precision": "fp32", "warmup_steps": 1, "threads": 1, "out": out}
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(nproc: int, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def _one_process(args: list[str]) -> None:
    """The 1-process reference, in this process (no torchrun start-up): the same worker code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rankwise_test_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    threads = torch.get_num_threads()
    try:
        worker.main(args)
    finally:
        torch.set_num_threads(threads)


def _ranks(out: Path, nproc: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _assert_same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


def _exact(a: dict, b: dict) -> None:
    _assert_same(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("parallel,method", [(p, m) for p in ("ddp", "fsdp")
                                             for m in ("lora", "dora", "ffba", "full", "lora-fa")])
def test_two_processes_equal_one_with_same_global_batch(tiny_model_dir, tmp_path, parallel, method):
    one, two = tmp_path / "one", tmp_path / "two"
    common = {"method": method, "grad_accum": 2, "lr": 1e-3 if method == "full" else 3e-3}
    _one_process(_base(tiny_model_dir, one, batch_size=4, **common))
    _torchrun(2, _base(tiny_model_dir, two, batch_size=2, parallel=parallel, **common))
    (single,), (r0, r1) = _ranks(one, 1), _ranks(two, 2)
    _exact(r0["tensors"], r1["tensors"])  # all ranks hold the same weights
    # same examples, same token-weighted loss; only the order of the gradient sums differs
    _assert_same(single["tensors"], r0["tensors"], rtol=1e-4, atol=2e-5)
    assert r0["summary"]["eval_loss"] == pytest.approx(single["summary"]["eval_loss"], abs=1e-5)
    # metrics count the global batch, written once by rank 0
    train = [r for r in read_metrics(two / "metrics.jsonl") if r["kind"] == "train"]
    single_train = [r for r in read_metrics(one / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["tokens"] for r in train] == [r["tokens"] for r in single_train]
    for a, b in zip(train, single_train):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # rank 0's checkpoint holds the full (gathered) weights: the trained tensors, and LoRA-FA's frozen A too
    if method != "full":
        files = list((two / "checkpoints" / "step-000003" / "adapter").glob("*.safetensors"))
        saved = sum(t.numel() for t in load_file(files[0]).values())
        trained = sum(t.numel() for t in r0["tensors"].values())
        assert saved == (2 * trained if method == "lora-fa" else trained)


@pytest.mark.parametrize("parallel,extra", [
    ("ddp", {"optimizer": "loft", "fast_forward": "true", "ff.interval": 2, "ff.burn_in": 1,
             "ff.tiny_examples": 8, "lr": 1e-2}),
    ("fsdp", {"method": "lora-fa", "fast_forward": "true", "ff.interval": 2, "ff.burn_in": 1,
              "ff.tiny_examples": 8}),
])
def test_stopped_two_process_run_resumes_exactly(tiny_model_dir, tmp_path, parallel, extra):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = {"batch_size": 2, "steps": 5, "parallel": parallel, "save_every": 1, **extra}
    _torchrun(2, _base(tiny_model_dir, whole, **common))
    # rank 0 alone asks to stop after step 3 (as if only it got SIGTERM): both ranks stop and save there
    _torchrun(2, [*_base(tiny_model_dir, split, **common), "stop_at=3"])
    assert (split / "latest").read_text().strip().endswith("step-000003")
    assert all(r["summary"]["step"] == 3 for r in _ranks(split, 2))
    _torchrun(2, _base(tiny_model_dir, split, resume="latest", **common))
    w0, w1 = _ranks(whole, 2)
    s0, s1 = _ranks(split, 2)
    _exact(w0["tensors"], w1["tensors"])
    _exact(s0["tensors"], s1["tensors"])
    _exact(w0["tensors"], s0["tensors"])
    records = read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    if extra.get("fast_forward"):  # Fast Forward ran, and took the same decisions when resumed
        def stages(out):
            return [(r["step"], r["accepted"], r["loss_after"]) for r in read_metrics(out / "metrics.jsonl")
                    if r["kind"] == "ff"]
        assert stages(whole) and stages(split) == stages(whole)


def test_lora_pre_factor_updates_agree_across_ranks(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = {"method": "full", "optimizer": "lorapre", "lr": 1e-3, "steps": 3}
    _one_process(_base(tiny_model_dir, one, batch_size=4, **common))
    _torchrun(2, _base(tiny_model_dir, two, batch_size=2, **common))
    (single,), (r0, r1) = _ranks(one, 1), _ranks(two, 2)
    _exact(r0["tensors"], r1["tensors"])  # every rank made the same factor updates
    # and they follow the 1-process run: LoRA-Pre's normalised steps turn last-bit differences of the
    # gradient sums into visible moves of a few near-zero entries, so compare losses, not every entry
    assert r0["summary"]["eval_loss"] == pytest.approx(single["summary"]["eval_loss"], rel=1e-4)


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-4000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir()) if (out / "checkpoints").is_dir() else []


def _children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in kids.read_text().split()] if kids.exists() else []


def test_sigkilled_worker_leaves_last_checkpoint_and_resume_finishes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _base(tiny_model_dir, out, batch_size=2, steps=400, save_every=1, schedule="constant")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(lambda: len(_checkpoints(out)) >= 2, "two checkpoints", proc)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # rank 1 dies mid-run without warning
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    latest = out / (out / "latest").read_text().strip()
    meta = json.loads((latest / "rankwise.json").read_text())
    assert meta["step"] >= 2 and meta["world_size"] == 2
    torch.load(latest / "state.pt", weights_only=False)  # complete and readable
    assert list((latest / "adapter").glob("*.safetensors"))
    # resume continues from it (here to a nearby end, on 2 processes again)
    done = _torchrun(2, _base(tiny_model_dir, out, batch_size=2, steps=meta["step"] + 2, save_every=1,
                              schedule="constant", resume="latest"))
    assert f"resumed from {latest}" in done.stdout
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, meta["step"] + 3))  # no step lost or logged twice


def test_cli_nproc_relaunches_under_torchrun_and_passes_sigterm_on(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _base(tiny_model_dir, out, batch_size=2, steps=400, save_every=1, schedule="constant", nproc=2)
    proc = subprocess.Popen([sys.executable, "-m", "rankwise", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(lambda: len(_checkpoints(out)) >= 1, "a checkpoint", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert "world: 2 processes (ddp, gloo)" in stdout + stderr
    assert "stopped by SIGTERM" in stdout + stderr
    latest = out / (out / "latest").read_text().strip()
    step = json.loads((latest / "rankwise.json").read_text())["step"]
    assert 1 <= step < 400
    assert not _processes_mentioning(str(out))  # no orphaned workers


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found
