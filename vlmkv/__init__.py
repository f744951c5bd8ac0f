"""vlmkv: 2-4 bit KV caches for Hugging Face vision-language models.

    import vlmkv
    model, tok = vlmkv.load_model("smollm2-135m")
    cache = vlmkv.QuantizedKVCache(model, "kivi", bits=2)
    out = model.generate(**inputs, **vlmkv.cache_kwargs(cache), max_new_tokens=64)
    # transformers >= 5.24: cache=cache; older: past_key_values=cache
"""
from .policies import BitPlan, DecodeRule, Policy, PrefillContext, get_policy, list_policies, register_policy

__version__ = "0.1.0"


def __getattr__(name):
    # transformers-dependent parts are imported lazily so that `vlmkv.quant` stays light
    if name in ("QuantizedKVCache", "QuantizedKVLayer", "cache_kwargs", "cache_kwarg"):
        from . import cache

        return getattr(cache, name)
    if name in ("load_model", "EMBEDDED_MODELS"):
        from .models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'vlmkv' has no attribute {name!r}")


__all__ = ["QuantizedKVCache", "cache_kwargs", "load_model", "get_policy", "list_policies", "register_policy",
           "Policy", "BitPlan", "DecodeRule", "PrefillContext", "__version__"]
