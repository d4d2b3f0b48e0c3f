"""Small shims over transformers versions (>= 5.23) used by decode loops."""

from __future__ import annotations

import functools
import inspect

from torch import nn


def cache_kwargs(model: nn.Module, output) -> dict:
    """The keyword that passes `output`'s KV cache to the model's next forward.

    transformers 5.24 renamed `past_key_values` to `cache`, in model outputs and in forward
    arguments (the old name still works there, with a deprecation warning).

    Args:
        model: a transformers causal LM.
        output: the previous forward's output (a ModelOutput with the cache).
    Returns:
        {"cache": ...} or {"past_key_values": ...}.
    """
    return {_cache_keyword(type(model)): output.cache if "cache" in output
            else output.past_key_values}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # Once per class: decode loops call cache_kwargs every step, and signature() is not free.
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
