"""Fault tolerance: a kill, a signal, a diverged loss, a full or unwritable disk never cost the last good
checkpoint, and resume=latest continues from it to the same weights as a run that was never stopped.

Runs use a constant schedule and no dropout, so a resumed run may also change `steps` and still match an
uninterrupted run of that length bit for bit; threads=1 makes subprocess and in-process math identical.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise import cli
from rankwise.config import ConfigError, load_config
from rankwise.train import checkpoint as ckpt
from rankwise.recipes import train as recipe
from rankwise.recipes.train import CheckpointError, TrainingDiverged, train

ADAPTER_FILE = "adapter_model.safetensors"


def quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """48 short pairs: encoding takes milliseconds, not the seconds of the built-in set."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"def times_{i}(x):\n    return x * {i}", "response": f"Multiply x by {i}."}
            for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def args(tiny_model_dir, small_data):
    """key=value overrides for a fast, exactly resumable run writing to `out`."""

    def make(out, **extra) -> list[str]:
        base = {"model": tiny_model_dir, "data": small_data, "out": out, "steps": 6, "batch_size": 2,
                "max_length": 64, "lr": 3e-3, "rank": 4, "alpha": 8, "dropout": 0.0, "schedule": "constant",
                "warmup_steps": 0, "eval_every": 0, "eval_examples": 4, "save_every": 2, "sample": False,
                "precision": "fp32", "threads": 1}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]

    return make


@pytest.fixture(scope="module")
def cfg(args):
    return lambda out, **extra: load_config(None, args(out, **extra))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # runs set threads=1 process-wide
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory):
    """Final adapter tensors and held-out loss of an uninterrupted run of `steps` steps (cached)."""
    done = {}

    def get(steps: int) -> tuple[dict, float]:
        if steps not in done:
            out = tmp_path_factory.mktemp(f"whole-{steps}")
            summary = train(cfg(out, steps=steps, save_every=0), say=quiet)
            done[steps] = (load_file(f"{summary['checkpoint']}/adapter/{ADAPTER_FILE}"), summary["eval_loss"])
        return done[steps]

    return get


# ---- what every interrupted run must leave behind ---------------------------------------------------
def assert_complete(path: Path) -> int:
    """A checkpoint whose every file loads; returns its step."""
    meta = ckpt.read_meta(path)
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert load_file(path / "adapter" / ADAPTER_FILE)
    state = torch.load(path / "state.pt", weights_only=False)
    assert state["step"] == meta["step"]
    return meta["step"]


def assert_intact(out: Path, step: int) -> None:
    """`latest` names a complete checkpoint at `step`; every visible checkpoint is complete; the log is
    valid JSONL; no temporary directory is left (for runs that failed cleanly)."""
    latest = ckpt.resolve("latest", out)
    assert latest == ckpt.checkpoint_dir(out, step)
    assert assert_complete(latest) == step
    for path in (out / "checkpoints").glob("step-*"):
        assert_complete(path)
    assert not [p.name for p in (out / "checkpoints").glob(".*")]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines]  # every line parses


def train_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_matches(summary: dict, ref: tuple[dict, float]) -> None:
    got = load_file(f"{summary['checkpoint']}/adapter/{ADAPTER_FILE}")
    assert got.keys() == ref[0].keys()
    for name in got:
        torch.testing.assert_close(got[name], ref[0][name], rtol=0, atol=0)
    assert summary["eval_loss"] == ref[1]


def poll(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Wait for `condition()` while `proc` runs; fail with its output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for the run:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def saved_step(out: Path) -> int:
    try:
        return ckpt.read_meta(ckpt.resolve("latest", out))["step"]
    except (FileNotFoundError, json.JSONDecodeError):  # nothing yet, or pruned between the two reads
        return 0


# ---- kills ---------------------------------------------------------------------------------------
def test_sigkill_mid_run_keeps_latest_and_resume_is_exact(args, cfg, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "rankwise", "train", *args(out, steps=400, save_every=1)],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        poll(lambda: saved_step(out) >= 2, proc, log)
        proc.send_signal(signal.SIGKILL)  # mid-step or mid-save, wherever it is
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    latest = ckpt.resolve("latest", out)
    step = assert_complete(latest)
    assert step >= 2
    for path in (out / "checkpoints").glob("step-*"):
        assert_complete(path)
    assert train_steps(out)[:step] == list(range(1, step + 1))  # every line whole, none lost before `step`
    (out / "checkpoints" / ".step-000999.dead").mkdir()  # what a kill during a save leaves

    summary = train(cfg(out, resume="latest", steps=step + 3, save_every=1), say=quiet)
    assert summary["step"] == step + 3
    assert_intact(out, step + 3)
    assert train_steps(out) == list(range(1, step + 4))  # cut back to the checkpoint, not duplicated
    assert_matches(summary, reference(step + 3))


STALL_IN_SAVE = """
import sys, time
from rankwise.train import checkpoint

save = checkpoint.save_checkpoint

def stalls_at_step_4(run_dir, step, write_adapter, *rest, **kwargs):
    def write(path):
        write_adapter(path)
        if step == 4:  # the adapter is written, the optimizer state only half
            (path.parent / "state.pt").write_bytes(b"PK half a zip")
            open(sys.argv[1], "w").close()
            time.sleep(600)
    return save(run_dir, step, write, *rest, **kwargs)

checkpoint.save_checkpoint = stalls_at_step_4
from rankwise.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_save_keeps_previous_checkpoint(args, cfg, reference, tmp_path):
    out, log, marker = tmp_path / "run", tmp_path / "run.log", tmp_path / "in-save"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", STALL_IN_SAVE, str(marker), "train", *args(out)],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        poll(marker.exists, proc, log)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    assert ckpt.resolve("latest", out) == ckpt.checkpoint_dir(out, 2)
    assert assert_complete(ckpt.checkpoint_dir(out, 2)) == 2
    assert not ckpt.checkpoint_dir(out, 4).exists()
    (partial,) = (out / "checkpoints").glob(".step-000004.*")
    assert (partial / "adapter" / ADAPTER_FILE).is_file()  # the kill really landed inside the save

    summary = train(cfg(out, resume="latest"), say=quiet)
    assert_intact(out, 6)  # the partial save was cleared away
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]
    assert_matches(summary, reference(6))


def test_killed_between_renames_of_a_resave(cfg, reference, tmp_path):
    out = tmp_path / "run"
    train(cfg(out, steps=4), say=quiet)
    # a re-save of step 4 moves the old copy aside, then renames the new one in; a kill in between leaves:
    final = ckpt.checkpoint_dir(out, 4)
    final.rename(final.parent / ".old-step-000004")
    (final.parent / ".step-000004.new").mkdir()
    assert ckpt.resolve("latest", out) == final.parent / ".old-step-000004"

    summary = train(cfg(out, resume="latest"), say=quiet)
    assert_intact(out, 6)
    assert_matches(summary, reference(6))


def writes(text):
    return lambda path: (path / "w.txt").write_text(text)


def test_failed_rename_of_a_resave_restores_the_old_copy(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path, 3, writes("old"), {"step": 3}, {})
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".step-"):
            raise KeyboardInterrupt  # between moving the old copy aside and renaming the new one in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, writes("new"), {"step": 3}, {})
    monkeypatch.undo()
    assert ckpt.resolve("latest", tmp_path) == good
    assert (good / "adapter" / "w.txt").read_text() == "old"
    assert sorted(p.name for p in good.parent.iterdir()) == ["step-000003"]


def test_kill_while_pruning_shows_no_half_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, writes("s"), {"step": step}, {}, keep=2)

    def dies_halfway(path, *_args, **_kwargs):  # deleting the oldest checkpoint: one file gone, then killed
        (Path(path) / "state.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, writes("s"), {"step": 3}, {}, keep=2)
    monkeypatch.undo()
    assert ckpt.resolve("latest", tmp_path) == ckpt.checkpoint_dir(tmp_path, 3)
    visible = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [p.name for p in visible] == ["step-000002", "step-000003"]
    assert all((p / "state.pt").is_file() for p in visible)


# ---- signals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("at_step", [3, 4])  # 4: the stop re-saves the step just saved by save_every=2
def test_sigterm_saves_and_resume_is_exact(cfg, reference, tmp_path, monkeypatch, at_step):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = recipe.token_loss_sum

    def signalled(model, batch):  # the signal arrives in the middle of step `at_step`
        calls["n"] += 1
        if calls["n"] == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "token_loss_sum", signalled)
        stopped = train(cfg(out), say=quiet)
    assert stopped["stopped"] == "SIGTERM" and stopped["step"] == at_step
    assert_intact(out, at_step)

    summary = train(cfg(out, resume="latest"), say=quiet)
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 6]
    assert_matches(summary, reference(6))


# ---- a diverged loss -----------------------------------------------------------------------------
def test_inf_loss_stops_keeps_last_good_and_resumes(cfg, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = recipe.token_loss_sum

    def overflowing(model, batch):  # step 4's loss overflows
        loss, n = real(model, batch)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] == 4 else loss), n

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "token_loss_sum", overflowing)
        with pytest.raises(TrainingDiverged, match=r"loss became inf at step 4; stopping \(last good checkpoint"):
            train(cfg(out), say=quiet)
    assert_intact(out, 2)
    assert train_steps(out) == [1, 2, 3]  # nothing logged for the step that diverged

    summary = train(cfg(out, resume="latest"), say=quiet)
    assert_intact(out, 6)
    assert_matches(summary, reference(6))


# ---- an unwritable or full disk ------------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Loading a tokenizer or model fails the test: rejection must come before."""

    def loaded(*_args, **_kwargs):
        raise AssertionError("weights loaded before out= was checked")

    monkeypatch.setattr(recipe, "load_model", loaded)
    monkeypatch.setattr(recipe, "load_tokenizer", loaded)


def rejected(args, cfg, out, capsys, match: str) -> None:
    """Both `rankwise train --dry-run` and train() refuse `out` with a one-line error."""
    assert cli.main(["train", "--dry-run", *args(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rankwise: error: out=") and match in err, err
    with pytest.raises(ConfigError, match=match):
        train(cfg(out), say=quiet)


@pytest.mark.parametrize("where", ["under-a-file", "under-proc"])
def test_unwritable_out_fails_before_weights_load(args, cfg, tmp_path, capsys, no_weights, where):
    if where == "under-a-file":  # root ignores permission bits, but not a file in the way
        (tmp_path / "file").write_text("x")
        out, match = tmp_path / "file" / "run", "is not a directory"
    else:  # /proc takes no new files, even from root
        out, match = Path("/proc/rankwise-test/run"), "is not writable"
    rejected(args, cfg, out, capsys, match)


def test_full_disk_fails_before_weights_load(args, cfg, tmp_path, capsys, no_weights, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)  # every write(2) now finds the disk full
    rejected(args, cfg, tmp_path / "run", capsys, "No space left on device")
    assert not (tmp_path / "run").exists()


def test_full_disk_mid_checkpoint_keeps_previous_and_resumes(cfg, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def fills_disk(obj, path, *rest, **kwargs):  # the second checkpoint's state gets half written
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"PK half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *rest, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", fills_disk)
        with pytest.raises(CheckpointError, match=r"could not save the checkpoint at step 4 .*No space left on "
                                                  r"device.*the previous checkpoint is intact"):
            train(cfg(out), say=quiet)
    assert_intact(out, 2)

    summary = train(cfg(out, resume="latest"), say=quiet)
    assert_intact(out, 6)
    assert_matches(summary, reference(6))


def test_full_disk_mid_log_line_keeps_log_valid_and_resumes(cfg, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = os.write
    full = {"now": False}

    def fills_disk(fd, data):  # step 3's record: the first half lands, then the disk is full
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if bytes(data[:12]) == b'{"step": 3, ':
            full["now"] = True
            return real_write(fd, data[:len(data) // 2])
        return real_write(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", fills_disk)
        with pytest.raises(OSError, match=r"could not append to .*metrics.jsonl: No space left on device"):
            train(cfg(out), say=quiet)
    assert full["now"]  # the record really was cut in half
    assert_intact(out, 2)
    assert train_steps(out) == [1, 2]  # the half line was taken back

    summary = train(cfg(out, resume="latest"), say=quiet)
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]
    assert_matches(summary, reference(6))


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up. Needs root in a container allowed to mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` with one file until writes fail, then give back `leave` bytes."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


# which writer meets the full disk: safetensors (the adapter, 36 kB) or torch.save (the state, 95 kB); both
# raise their own exception types, which the checkpoint must report as the OSError it is
@pytest.mark.parametrize("leave", [24_000, 64_000], ids=["in-adapter", "in-state"])
def test_really_full_disk_mid_run_keeps_previous_and_resumes(cfg, reference, small_disk, monkeypatch, leave):
    out = small_disk / "run"
    save = ckpt.save_checkpoint
    filler = []

    def then_fill(run_dir, step, *rest, **kwargs):
        saved = save(run_dir, step, *rest, **kwargs)
        if step == 2:
            filler.append(fill(small_disk, leave))
        return saved

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_checkpoint", then_fill)
        with pytest.raises(CheckpointError, match=r"at step 4 .*No space left on device \(while writing: "):
            train(cfg(out), say=quiet)
    assert_intact(out, 2)
    assert train_steps(out) == [1, 2, 3, 4]

    filler[0].unlink()  # free space, then resume
    summary = train(cfg(out, resume="latest"), say=quiet)
    assert_intact(out, 6)
    assert_matches(summary, reference(6))


# ---- the command line reports these in one line, no traceback --------------------------------------
@pytest.mark.parametrize("fault", ["diverged", "disk full"])
def test_cli_reports_run_faults_in_one_line(args, tmp_path, monkeypatch, capsys, fault):
    out = tmp_path / "run"
    if fault == "diverged":
        real = recipe.token_loss_sum
        monkeypatch.setattr(recipe, "token_loss_sum", lambda m, b: (lambda ln: (ln[0] * float("nan"), ln[1]))(real(m, b)))
        expected = "rankwise: error: loss became nan at step 1; stopping (no checkpoint was saved yet)"
    else:
        def full(obj, path, *rest, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", full)
        expected = "rankwise: error: could not save the checkpoint at step 2"
    assert cli.main(["train", *args(out)]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].startswith(expected) and "Traceback" not in err
