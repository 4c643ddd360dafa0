"""runtime's device helpers: --device resolution, and the dense bf16 peaks that MFU is measured against."""
from __future__ import annotations

import pytest
import torch

from rankwise import runtime

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")


@pytest.fixture
def device_named(monkeypatch):
    """Make torch.cuda report `name` for every device (no GPU needed)."""

    def name(value):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: value)

    return name


def test_no_peak_and_no_mfu_on_cpu():
    assert runtime.peak_flops("cpu") is None
    assert runtime.peak_flops(torch.device("cpu")) is None
    assert runtime.mfu(1e12, 1.0, "cpu") is None


@pytest.mark.parametrize("name, flops, label", [
    ("NVIDIA H200", 989e12, "H200 SXM"),
    ("NVIDIA H100 80GB HBM3", 989e12, "H100 SXM"),
    ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", 312e12, "A100"),
    ("NVIDIA A100-PCIE-40GB", 312e12, "A100"),
    ("NVIDIA A100 80GB PCIe", 312e12, "A100"),
    ("NVIDIA L40S", 362e12, "L40S"),
    ("NVIDIA GeForce RTX 4090", 165e12, "RTX 4090"),
])
def test_a_known_device_name_resolves_to_its_dense_bf16_peak(device_named, name, flops, label):
    device_named(name)
    assert runtime.peak_flops("cuda") == (flops, label)
    assert runtime.peak_flops(torch.device("cuda", 0)) == (flops, label)


@pytest.mark.parametrize("name", ["NVIDIA H200 NVL", "NVIDIA H100 NVL", "NVIDIA GH200 480GB",
                                  "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU",
                                  "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA B200", "Tesla T4"])
def test_other_boards_and_mig_slices_have_no_peak_rather_than_a_wrong_one(device_named, name):
    device_named(name)
    assert runtime.peak_flops("cuda") is None
    assert runtime.mfu(1e12, 1.0, "cuda") is None


def test_mfu_is_measured_flops_per_second_over_the_peak(device_named):
    device_named("NVIDIA H200")
    assert runtime.mfu(989e12 * 0.25 * 2, 2.0, "cuda") == pytest.approx(0.25)
    assert runtime.mfu(1e12, 0.0, "cuda") is None  # nothing timed
    assert runtime.mfu(0.0, 1.0, "cuda") is None  # nothing counted (count_flops=false)


def test_an_unreadable_device_name_means_no_peak(monkeypatch):
    def fail(device=None):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_name", fail)
    assert runtime.peak_flops("cuda") is None


def test_resolve_device_picks_cuda_only_when_present():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@no_cuda
def test_resolve_device_refuses_cuda_in_one_line_where_there_is_none():
    with pytest.raises(ValueError, match="no CUDA device is visible") as error:
        runtime.resolve_device("cuda")
    assert "\n" not in str(error.value)
