"""Shared bench helpers: the process-memory readings every CPU memory benchmark relies on, and atomic JSON."""
from __future__ import annotations

import json
import sys

import pytest

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
