"""Device, precision and seeding: the few process-wide settings every command shares."""
from __future__ import annotations

import contextlib
import functools
import random
import re

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """A zero-argument context-manager factory: bf16 autocast (fp32 weights) or nothing."""
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str = "auto") -> torch.device:
    """A bench's --device: auto (cuda when present, else cpu), cpu or cuda[:N]; a one-line ValueError when
    CUDA is asked for and none is visible, before anything is built on it."""
    device = pick_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False); "
                         f"use --device cpu or auto")
    return device


# Dense bf16 tensor-core peaks (FLOP/s, fp32 accumulate), WITHOUT 2:4 structured sparsity: NVIDIA's
# datasheets quote the sparse figure (twice these) with an asterisk. H100 SXM 1,979 / PCIe 1,513 sparse
# (H100 datasheet); H200 SXM 1,979 sparse (H200 datasheet; the same GH100 compute as H100 SXM); A100
# 624 sparse, SXM4 and PCIe alike (A100 datasheet); L40S 733 sparse (L40S datasheet); RTX 4090 330.4
# sparse (Ada whitepaper, bf16 with fp32 accumulate); checked against published copies of those sheets.
# Matched against the whole device name less "NVIDIA " / "GeForce ", so other boards (H100/H200 NVL,
# GH200, RTX 4090 D / Laptop) and MIG slices get None: their peak is not one of these, and a wrong peak
# would be worse than none.
PEAK_BF16_DENSE = (
    (r"H100( SXM\d?)?( \d+GB)?( HBM3e?)?", 989e12, "H100 SXM"),
    (r"H100 PCIe( \d+GB)?", 756e12, "H100 PCIe"),
    (r"H200( SXM\d?)?( \d+GB)?", 989e12, "H200 SXM"),
    (r"A100([- ](SXM\d?|PCIE|PCIe|\d+GB))*", 312e12, "A100"),
    (r"L40S", 362e12, "L40S"),
    (r"RTX 4090", 165e12, "RTX 4090"),
)


def peak_flops(device) -> tuple[float, str] | None:
    """(dense bf16 tensor-core peak in FLOP/s, the table entry it matched) for a CUDA device whose name is
    in PEAK_BF16_DENSE; None on CPU, for an unknown device, or when the name cannot be read."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        name = torch.cuda.get_device_name(device)
    except (AssertionError, RuntimeError):  # no CUDA in this build or on this machine
        return None
    short = re.sub(r"^(NVIDIA )?(GeForce )?", "", name.strip())
    if "MIG" in short:
        return None
    for pattern, flops, label in PEAK_BF16_DENSE:
        if re.fullmatch(pattern, short):
            return flops, label
    return None


def mfu(flops: float, seconds: float, device) -> float | None:
    """Model FLOPs utilisation: `flops` done in `seconds` over the device's dense bf16 peak; None where
    the peak is unknown (CPU, an unlisted GPU) or nothing was measured."""
    peak = peak_flops(device)
    if peak is None or seconds <= 0 or flops <= 0:
        return None
    return flops / seconds / peak[0]
