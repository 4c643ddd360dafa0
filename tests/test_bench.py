"""Shared bench helpers (the process-memory readings every CPU memory benchmark relies on, atomic JSON), and
the benches' devices: throughput end to end on CPU (and on CUDA where there is one), and --device cuda refused
in one line where there is none."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy
import pytest
import torch

from rankwise.bench import positive_numbers, proc_kib, reset_peak_rss, write_json

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")


@linux
def test_peak_rss_rises_with_a_touched_buffer_and_resets_when_it_is_freed():
    reset_peak_rss()
    base = proc_kib("VmHWM")
    buffer = bytearray(64 * 2**20)  # zero-filled: every page touched
    assert proc_kib("VmRSS") >= base + 60 * 1024
    del buffer
    assert proc_kib("VmHWM") >= base + 60 * 1024  # the mark keeps the peak after the free
    reset_peak_rss()
    assert proc_kib("VmHWM") < base + 30 * 1024  # and is reset to what is resident now
    with pytest.raises(KeyError):
        proc_kib("NoSuchField")


def test_write_json_replaces_whole_files_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": [2, 3]})
    assert json.loads(path.read_text()) == {"x": [2, 3]}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no temporary file left behind


def test_positive_numbers_parses_option_lists_or_names_the_option():
    assert positive_numbers("--lr", "1e-3, 2e-3,") == [1e-3, 2e-3]
    assert positive_numbers("--ranks", 4, int) == [4]
    for text, message in (("1e-3,fast", "--lr: expected comma-separated numbers"), ("1e-3,0", "--lr: every value"),
                          ("", "--lr: every value")):
        with pytest.raises(ValueError, match=message):
            positive_numbers("--lr", text)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")


def _throughput(tmp_path, device: str) -> dict:
    """The command itself, in its own process: training here would leave torch's CPU thread pool busy in
    the test process, and a bench forked from it later (optimizers, loft) would then hang."""
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, "-m", "rankwise", "bench", "throughput", "--scale", "tiny", "--steps", "3",
                           "--repeats", "1", "--device", device, "--out", str(out), "max_length=128"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio rankwise / Trainer" in done.stdout
    report = json.loads(out.read_text())
    assert report["timed_steps"] == 1
    assert all(len(v) == 1 and v[0] > 0 for v in report["tokens_per_s"].values())
    return report


def test_throughput_bench_runs_end_to_end_on_cpu(tmp_path):
    report = _throughput(tmp_path, "cpu")
    assert report["device"] == "cpu" and report["device_name"] == "cpu"
    assert "mfu" not in report  # no peak to measure against on a CPU


@cuda
def test_throughput_bench_runs_end_to_end_on_cuda(tmp_path):
    from rankwise.runtime import peak_flops

    report = _throughput(tmp_path, "cuda")
    assert report["device"].startswith("cuda") and report["device_name"] == torch.cuda.get_device_name()
    if peak_flops("cuda") is not None:  # a GPU of known peak: both sides' utilisation, against that peak
        assert report["peak"]["name"] == peak_flops("cuda")[1]
        assert all(0 < u < 1 for u in report["mfu"].values())


def test_throughput_utilisation_uses_the_measured_flops_and_each_sides_seconds(monkeypatch):
    from rankwise.bench.throughput import _utilisation

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    got = _utilisation("cuda", 989e12, {"rankwise": [2.0, 4.0, 8.0], "trainer": [10.0]})
    assert got["peak"]["name"] == "H200 SXM" and got["peak"]["flops_per_s"] == 989e12
    assert got["mfu"] == {"rankwise": pytest.approx(0.25), "trainer": pytest.approx(0.1)}  # medians
    assert _utilisation("cuda", 0.0, {"rankwise": [1.0]}) == {}  # count_flops=false: nothing to report
    assert _utilisation("cpu", 1e12, {"rankwise": [1.0]}) == {}


def test_throughput_ratio_is_the_median_over_repeats_of_each_side_then_their_quotient():
    from rankwise.bench.throughput import speedup

    median, ratio = speedup({"rankwise": [100.0, 300.0, 200.0], "trainer": [100.0, 50.0, 400.0]})
    assert median == {"rankwise": 200.0, "trainer": 100.0} and ratio == 2.0  # means would give 200 / 183


def test_throughput_tokens_per_second_counts_non_pad_tokens_after_the_warmup_steps():
    from rankwise.bench.throughput import WARMUP_STEPS, _tokens_per_second

    masks = [[1] * 5, [1] * 5, [1] * 6 + [0] * 4, [1] * 10]  # the first two are warm-up steps
    batches = [{"attention_mask": numpy.array([m])} for m in masks]  # (no torch work here: later tests fork)
    assert WARMUP_STEPS == 2 and _tokens_per_second(batches, [9.0, 9.0, 2.0, 3.0]) == (6 + 10) / (2.0 + 3.0)


@no_cuda
@pytest.mark.parametrize("bench", ["throughput", "memory", "latency", "loft"])
def test_benches_refuse_cuda_in_one_line_where_there_is_none(bench, capsys):
    import importlib

    main = importlib.import_module(f"rankwise.bench.{bench}").main
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cuda"])
    assert stop.value.code == 2  # argparse's usage error, before anything is built
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


@no_cuda
def test_optimizers_bench_refuses_cuda_where_there_is_none(tmp_path):
    from rankwise.bench.optimizers import main

    for finetune in ([], ["--finetune"]):
        with pytest.raises(SystemExit, match="no CUDA device is visible"):
            main(["--device", "cuda", "--workdir", str(tmp_path / "w")] + finetune)
    assert not (tmp_path / "w").exists()
