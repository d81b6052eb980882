"""Helpers shared by the reference scripts (make_fixtures.py, bench_torch.py)."""

import inspect


def cache_kwarg(model):
    """The name forward() takes the KV cache under: `cache` (transformers >= 5.x) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_cached(model, input_ids, cache, kwarg=None):
    """One forward with use_cache=True; returns (output, the updated cache)."""
    kwarg = kwarg or cache_kwarg(model)
    kw = {kwarg: cache} if cache is not None else {}
    out = model(input_ids, use_cache=True, **kw)
    # A DynamicCache defines __len__, so an empty one is falsy: test against None explicitly.
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out, new_cache
