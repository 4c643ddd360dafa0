"""Tiny randomly initialised models saved as ordinary local model directories.

Tests and `--scale tiny` benchmarks use them: they exercise exactly the code path a user's local
model takes, in seconds. The tokenizer is a small BPE trained offline on standard-library docstrings.
"""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer with a ChatML template, trained on stdlib docstrings (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rankwise.data.stdlib_docstrings import extract

    texts = [p["prompt"] + "\n" + p["response"] for p in extract()[:1500]]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  bos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=1, eos_token_id=3)
    return LlamaForCausalLM(config)


def make_tiny_model_dir(path: str | Path, seed: int = 0, **shape) -> Path:
    """Write a tiny random Llama and its tokenizer to `path`; returns the path."""
    path = Path(path)
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=seed, **shape)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
