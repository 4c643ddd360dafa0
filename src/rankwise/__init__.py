"""rankwise: low-rank training of causal language models, faster, leaner and measured."""
import logging

__version__ = "0.1.0"

# bitsandbytes (pulled in by galore-torch, imported by PEFT) warns on every CPU start about an
# optional hub kernel we never use; keep our users' output about their run
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
