"""LoRA-FA (Zhang et al., arXiv 2308.03303): LoRA with A frozen, B trained on a corrected gradient."""
from rankwise.lorafa.branch import FrozenABranch, frozen_a_branch, gram_inverse
from rankwise.lorafa.layer import INITS, FrozenALinear, lora_layers, svd_rows, to_lora_fa

__all__ = ["FrozenABranch", "frozen_a_branch", "gram_inverse", "FrozenALinear", "INITS", "lora_layers",
           "svd_rows", "to_lora_fa"]
