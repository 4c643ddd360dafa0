"""Fused forward-backward adapters (FLoRA / FFBA, arXiv 2511.00050): forward (parallel) and backward
(cross-junction) adapters fused into the projections a Llama-family model already runs. See layers.py."""
from rankwise.ffba.inject import (SUPPORTED, Junction, adapters, check_architecture, fuse, inject, junctions,
                                  parameter_count)
from rankwise.ffba.layers import Adapter, Carrier, Emit, FusedAttention, FusedMLP, Parallel, Receive
from rankwise.ffba.settings import BLOCKS, VARIANTS, Settings

__all__ = ["SUPPORTED", "BLOCKS", "VARIANTS", "Adapter", "Carrier", "Emit", "FusedAttention", "FusedMLP", "Junction",
           "Parallel", "Receive", "Settings", "adapters", "check_architecture", "fuse", "inject", "junctions",
           "parameter_count"]
