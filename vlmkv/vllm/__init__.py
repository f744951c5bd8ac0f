"""vlmkv's quantized KV pages inside vLLM, as a plugin (`pip install 'vlmkv[vllm]'`; the layout: docs/VLLM.md).

vLLM loads `register` through the entry point group `vllm.general_plugins` in every process. It replaces the CPU
platform's attention backend (`CPU_ATTN`) by `vlmkv.vllm.cpu.VlmkvCPUBackend` and registers the CUDA backend
`vlmkv.vllm.cuda.VlmkvCudaBackend` as `CUSTOM`. Both behave exactly as vLLM's own backend until a format is asked
for in vLLM's `additional_config`:

    LLM(model, additional_config={"vlmkv": {"format": "kivi-2"}})
    vllm serve MODEL --additional-config '{"vlmkv": {"format": "kivi-4", "hadamard": true}}'

Keys: `format` (`rtn-8`, `rtn-4`, `rtn-2`, `kivi-8`, `kivi-4`, `kivi-2`), `group_size` (channels per per-token
group; 0, the default: the whole head), `hadamard` (rotate keys and values before quantizing; default false),
`key_group` (kivi: tokens a per-channel key group spans; 0, the default: 64 where it divides the block).
A combination the plugin cannot serve exactly (an fp8 `kv_cache_dtype`, sliding-window or MLA layers, another vLLM
minor) refuses to start with a ValueError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

#: the vLLM minor release the plugin is written and tested against (its internals move between minors)
VLLM_MINOR = "0.32"
SETTINGS_KEY = "vlmkv"


@dataclass(frozen=True)
class Settings:
    """What `additional_config["vlmkv"]` asks for."""

    format: str
    group_size: int = 0
    hadamard: bool = False
    key_group: int = 0

    def page_format(self, head_dim: int, block_size: int):
        from .pages import PageFormat

        return PageFormat.parse(self.format, head_dim, block_size, self.group_size, self.hadamard, self.key_group)


def settings_from(additional_config) -> Settings | None:
    """The plugin's settings from vLLM's `additional_config` (a dict); None when it asks for none. ValueError in one
    line for an unknown key or a value of the wrong type."""
    if not additional_config:
        return None
    if not isinstance(additional_config, dict):
        additional_config = dict(additional_config)
    raw = additional_config.get(SETTINGS_KEY)
    if raw is None:
        return None
    known = {f.name for f in fields(Settings)}
    if not isinstance(raw, dict) or "format" not in raw or set(raw) - known:
        raise ValueError(f"additional_config['{SETTINGS_KEY}'] must be a dict with 'format' and optionally "
                         f"'group_size', 'hadamard', 'key_group', got {raw!r}")
    g, h, kg = raw.get("group_size", 0), raw.get("hadamard", False), raw.get("key_group", 0)
    for name, x in (("group_size", g), ("key_group", kg)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise ValueError(f"additional_config['{SETTINGS_KEY}']['{name}'] must be an int >= 0, got {x!r}")
    if not isinstance(h, bool):
        raise ValueError(f"additional_config['{SETTINGS_KEY}']['hadamard'] must be true or false, got {h!r}")
    s = Settings(str(raw["format"]), g, h, kg)
    s.page_format(64, 128)  # the name and groups checked now, before any model loads
    return s


def check_vllm_version() -> None:
    """ValueError unless the installed vLLM is the minor release the plugin is written for."""
    import vllm

    v = getattr(vllm, "__version__", "?")
    if not v.startswith(VLLM_MINOR + "."):
        raise ValueError(f"vlmkv's vLLM plugin is written for vLLM {VLLM_MINOR}.x (pip install 'vlmkv[vllm]'), "
                         f"got vLLM {v!r}")


def register() -> None:
    """The `vllm.general_plugins` entry point: put vlmkv's backends in vLLM's registry (idempotent; vLLM calls it in
    every process it starts)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "vlmkv.vllm.cpu.VlmkvCPUBackend")
    register_backend(AttentionBackendEnum.CUSTOM, "vlmkv.vllm.cuda.VlmkvCudaBackend")


__all__ = ["Settings", "settings_from", "register", "check_vllm_version", "VLLM_MINOR"]
