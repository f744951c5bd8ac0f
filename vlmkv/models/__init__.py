"""Model loading (HF ids, local paths, the embedded GGUF backbone)."""
from .loading import EMBEDDED_MODELS, load_model, cache_dir

__all__ = ["EMBEDDED_MODELS", "load_model", "cache_dir"]
