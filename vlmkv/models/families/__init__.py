"""One file per model family; importing registers them."""
from . import llava, llava_onevision, qwen2_vl, idefics3  # noqa: F401
