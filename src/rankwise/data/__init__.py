"""Data: where examples come from (sources), how they become tensors (encode)."""
from rankwise.data.encode import IGNORE, collate, collate_packed, encode, encode_all, pack, prompt_ids
from rankwise.data.sources import DataError, Splits, check_data, load_splits

__all__ = ["IGNORE", "DataError", "Splits", "check_data", "collate", "collate_packed", "encode", "encode_all",
           "load_splits", "pack", "prompt_ids"]
