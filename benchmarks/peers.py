"""Peers of vlmkv's methods in the same teacher-forced harness (benchmarks/long_fidelity.py), at equal bytes.

* Token eviction, NVIDIA's kvpress (`pip install kvpress`, which pins transformers < 5.3: run the benchmark in
  `.venv-peers`, `bash scripts/setup-peers.sh`): its SnapKV, ExpectedAttention and Knorm presses at compression
  ratios that land on 2-6 bits an element, and SnapKV over transformers' quantized cache (optimum-quanto, 4 bits),
  kvpress's way of combining eviction with quantization. A press compresses the prompt's cache in the prefill's
  forward; the continuation is then fed one token at a time at positions N, N + 1, ... as kvpress's pipeline does.
* TurboQuant (Zandieh et al., ICLR 2026), its MSE quantizer written here from the paper: a random rotation (one
  seeded orthogonal matrix a head dimension), then each coordinate to the nearest of 2^b Lloyd-Max levels for the
  law of a coordinate of a unit vector (`vlmkv.quant.codebook`), and one fp16 norm per head vector; every key and
  value of the prompt and of the continuation is stored so (b + 16 / head_dim bits an element).

Bytes are counted as vlmkv's caches count theirs, over every slot of the sequence (prompt and continuation): what a
cache holds after the last step, full-precision elements at 2 bytes (what an fp16 model holds; the float32 run here
holds 4), quantized ones at their codes and metadata (optimum-quanto's tensors as they are). A peer that does not
import or run is reported with its error (`PeerError`), never dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

PRESSES = {"snapkv": "SnapKVPress", "expected_attention": "ExpectedAttentionPress", "knorm": "KnormPress"}
RATIOS = (0.625, 0.75, 0.8, 0.84375, 0.875)  # kept fractions 3/8 .. 1/8: 6, 4, 3.2, 2.5 and 2 bits an element
TURBO_BITS = (2, 3, 4)


class PeerError(RuntimeError):
    """A peer that could not run here, with why (the row reports it)."""


def kvpress_module():
    """kvpress, or PeerError naming why it is not importable (with the transformers it pins)."""
    try:
        import kvpress
    except Exception as e:  # ImportError, or an incompatible transformers failing inside kvpress's import
        import transformers

        raise PeerError(f"kvpress does not import with transformers {transformers.__version__}: "
                        f"{type(e).__name__}: {str(e)[:200]}") from e
    return kvpress


def _fp16_bytes(t) -> int:
    return 0 if t is None or not torch.is_tensor(t) else 2 * t.numel()


@dataclass
class PressPeer:
    """A kvpress press at `ratio` (the share of the prompt's tokens it removes), optionally over transformers'
    QuantizedCache (optimum-quanto, `quant_bits`)."""

    press: str
    ratio: float
    quant_bits: int | None = None

    @property
    def family(self) -> str:
        return f"kvpress {self.press}" + (f"+quanto-{self.quant_bits}" if self.quant_bits else "")

    def describe(self) -> str:
        return f"kvpress.{PRESSES[self.press]}(compression_ratio={self.ratio})" + \
            (f" over QuantizedCache(quanto, nbits={self.quant_bits}, q_group_size=64, residual_length=128)"
             if self.quant_bits else "")

    def _cache(self, model):
        from transformers import QuantizedCache

        if self.quant_bits is None:
            return DynamicCache(config=model.config)
        try:
            import optimum.quanto  # noqa: F401
        except Exception as e:
            raise PeerError(f"optimum-quanto does not import: {type(e).__name__}: {str(e)[:200]}") from e
        return QuantizedCache(backend="quanto", config=model.config, nbits=self.quant_bits, q_group_size=64,
                              residual_length=128)

    #: kvpress's caches hold fewer slots than the sequence: later tokens take explicit positions and no mask
    positional = True

    @torch.no_grad()
    def forced(self, model, prompt: torch.Tensor, cont: torch.Tensor, src=None) -> tuple:
        """(logits `[1, T, V]` float32 of the prompt's last position and of each of the T-1 fed continuation
        tokens, bits an element after the last step, the cache). The press needs the prompt's forward (it
        compresses in its hooks): `src` is not used."""
        from vlmkv import cache_kwargs

        kvpress = kvpress_module()
        press = getattr(kvpress, PRESSES[self.press])(compression_ratio=self.ratio)
        cache = self._cache(model)
        n = prompt.shape[1]
        try:
            with press(model):
                first = model(input_ids=prompt, **cache_kwargs(cache), use_cache=True).logits[:, -1].float()
            logits = [first]
            for t in range(cont.shape[1] - 1):  # kvpress's pipeline: positions of the full sequence, no mask
                out = model(input_ids=cont[:, t:t + 1], **cache_kwargs(cache), use_cache=True,
                            position_ids=torch.tensor([[n + t]]))
                logits.append(out.logits[:, -1].float())
        except PeerError:
            raise
        except Exception as e:
            raise PeerError(f"{self.describe()} failed: {type(e).__name__}: {str(e)[:300]}") from e
        slots = n + cont.shape[1] - 1
        cfg = model.config
        heads = cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elements = 2 * cfg.num_hidden_layers * heads * d * slots
        return torch.stack(logits, 1), 8.0 * self._bytes(cache) / elements, cache

    def _bytes(self, cache) -> int:
        """What the cache holds after the last step: full-precision tensors at 2 bytes an element, optimum-quanto's
        packed tensors as they are (benchmarks/decode_bench.py's tensor_bytes)."""
        total = 0
        for layer in cache.layers:
            total += _fp16_bytes(getattr(layer, "keys", None)) + _fp16_bytes(getattr(layer, "values", None))
            if self.quant_bits:
                from decode_bench import tensor_bytes

                total += tensor_bytes(getattr(layer, "_quantized_keys", None))
                total += tensor_bytes(getattr(layer, "_quantized_values", None))
        return total


def random_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """float32 `[d, d]` orthogonal: the Q of a seeded Gaussian matrix's QR, column signs fixed (Haar-distributed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def turboquant_roundtrip(x: torch.Tensor, bits: int, rotation: torch.Tensor) -> torch.Tensor:
    """TurboQuant's MSE quantizer, quantized and read back: x `[..., d]` -> y = norm * (levels[codes] @ R^T), with
    u = (x / norm) @ R quantized coordinate-wise to the nearest Lloyd-Max level and the norm rounded to fp16."""
    from vlmkv.quant.codebook import levels

    d = x.shape[-1]
    lv = levels(bits, d).to(x.device)
    xf = x.float()
    norm = xf.norm(dim=-1, keepdim=True).to(torch.float16).float()
    u = (xf / norm.clamp_min(1e-30)) @ rotation.to(x.device)
    q = lv[torch.bucketize(u, (lv[1:] + lv[:-1]) / 2)]
    return ((q @ rotation.to(x.device).T) * norm).to(x.dtype)


class TurboQuantCache(DynamicCache):
    """A transformers DynamicCache whose every written key and value is TurboQuant-quantized (the values kept are
    the round trip, so attention reads exactly what the codes and norms hold)."""

    def __init__(self, config, bits: int):
        super().__init__(config=config)
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.bits, self.rotations = bits, (random_rotation(d, 0), random_rotation(d, 1))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rk, rv = self.rotations
        k, v = super().update(turboquant_roundtrip(key_states, self.bits, rk),
                              turboquant_roundtrip(value_states, self.bits, rv), layer_idx, *args, **kwargs)
        n = key_states.shape[-2]
        if n > 1:  # a multi-token call (a second question) reads its own tokens unquantized, as vlmkv's caches do
            k = torch.cat([k[..., :-n, :], key_states.to(k.dtype)], dim=-2)
            v = torch.cat([v[..., :-n, :], value_states.to(v.dtype)], dim=-2)
        return k, v


@dataclass
class TurboQuantPeer:
    bits: int

    family = "turboquant"
    positional = False

    def describe(self) -> str:
        return f"TurboQuant-mse(bits={self.bits}, random rotation, Lloyd-Max levels, fp16 norm a head vector)"

    @torch.no_grad()
    def forced(self, model, prompt: torch.Tensor, cont: torch.Tensor, src=None) -> tuple:
        """As PressPeer.forced; with `src` (a shared `PromptPrefill`) the cache is filled from the recorded prompt."""
        from vlmkv.eval.fidelity import forced_continuation, prefill_logits

        cfg = model.config
        cache = TurboQuantCache(cfg, self.bits)
        mask = torch.ones_like(prompt)
        if src is not None and src.shared:
            src.fill(cache)
            first = src.first
        else:
            first = prefill_logits(model, prompt, mask, cache)
        logits = forced_continuation(model, mask, cache, cont, first)
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return logits, self.bits + 16.0 / d, cache


def peer_entries(names: str) -> list[tuple[str, object]]:
    """(label, peer) for a comma-separated list: "kvpress" (every press at every ratio, and SnapKV over quanto-4),
    "snapkv", "expected_attention", "knorm", "snapkv+quanto", "turboquant", or one point: "snapkv@0.75",
    "turboquant@3"."""
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        base, _, at = name.partition("@")
        if base == "kvpress":
            out += peer_entries(",".join(list(PRESSES) + ["snapkv+quanto"]))
        elif base in PRESSES:
            for r in ([float(at)] if at else RATIOS):
                out.append((f"{base}@{r}", PressPeer(base, r)))
        elif base == "snapkv+quanto":
            for r in ([float(at)] if at else (0.0, 0.25, 0.5, 0.6)):
                out.append((f"snapkv+quanto-4@{r}", PressPeer("snapkv", r, 4)))
        elif base == "turboquant":
            for b in ([int(at)] if at else TURBO_BITS):
                out.append((f"turboquant-{b}", TurboQuantPeer(b)))
        else:
            raise ValueError(f"peers must be among kvpress, {', '.join(PRESSES)}, snapkv+quanto, turboquant "
                             f"(optionally @ratio / @bits), got {name!r}")
    return out


def family_of(label: str) -> str:
    """The plotting family of a peer's label (`snapkv@0.75` -> `snapkv`)."""
    return label.split("@")[0].rsplit("-", 1)[0] if label.startswith("turboquant") else label.split("@")[0]


__all__ = ["PeerError", "PressPeer", "TurboQuantPeer", "peer_entries", "family_of", "kvpress_module",
           "turboquant_roundtrip", "random_rotation"]
