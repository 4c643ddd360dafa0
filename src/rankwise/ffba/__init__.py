"""Fused forward-backward adapters (FLoRA / FFBA, arXiv 2511.00050): parallel adapters fused into the
projections a Llama-family model already runs. See layers.py for the math."""
from rankwise.ffba.inject import SUPPORTED, adapters, check_architecture, fuse, inject
from rankwise.ffba.layers import Adapter, FusedAttention, FusedMLP, Parallel
from rankwise.ffba.settings import BLOCKS, Settings

__all__ = ["SUPPORTED", "BLOCKS", "Adapter", "FusedAttention", "FusedMLP", "Parallel", "Settings", "adapters",
           "check_architecture", "fuse", "inject"]
