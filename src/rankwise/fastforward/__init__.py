"""Fast Forward for low-rank training: the loop-agnostic component, its line searches, a Trainer callback.

    from rankwise.fastforward import FastForward
    ff = FastForward(trainable_tensors, tiny_loss_fn, {"interval": 6})
    ... optimizer.step(); scheduler.step(); ff.after_step()

`FastForwardCallback` (rankwise.fastforward.callback) does the same inside transformers.Trainer.
"""
from rankwise.fastforward.core import FastForward, FFOptions, check_options
from rankwise.fastforward.search import line_search

__all__ = ["FastForward", "FFOptions", "check_options", "line_search", "FastForwardCallback"]


def __getattr__(name):  # the callback imports transformers; load it only when asked for
    if name == "FastForwardCallback":
        from rankwise.fastforward.callback import FastForwardCallback

        return FastForwardCallback
    raise AttributeError(name)
