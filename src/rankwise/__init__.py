"""rankwise: low-rank training of causal language models, faster, leaner and measured."""
__version__ = "0.1.0"
