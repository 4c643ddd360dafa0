"""Data: where examples come from (sources), how they become tensors (encode)."""
from rankwise.data.encode import IGNORE, collate, encode, encode_all, prompt_ids
from rankwise.data.sources import DataError, Splits, check_data, load_splits

__all__ = ["IGNORE", "DataError", "Splits", "check_data", "collate", "encode", "encode_all", "load_splits",
           "prompt_ids"]
