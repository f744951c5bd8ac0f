"""bf16 linear layers computed through float32 GEMMs, for CPUs without bf16 instructions.

On a CPU without AVX512-BF16 / AMX (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is False), PyTorch's bf16
matmul runs an emulated kernel: measured here on a 2-core AVX2 EPYC, a [1530, 576] x [576, 1536] bf16 linear takes
0.30 s against 0.035 s in float32, and linear layers were 47.7 of the 49.5 s that pocket-long's 1,530-token bf16
prefill took. `linears_via_fp32(model)` keeps the model in bf16 (its activations, its KV cache, every other op)
and computes only the linear layers in float32: the same operation a bf16 GEMM performs (bf16 inputs, whose
products are exact in float32, summed in float32, one rounding of the output to bf16), in another summation
order, so outputs can differ from the native kernel by one bf16 rounding step, as the native kernel's own output
does between thread counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bf16_gemm_is_native() -> bool:
    """Whether this CPU has bf16 instructions that PyTorch's oneDNN kernels use (False: bf16 matmul is emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 path either
        return False


class Fp32Linear(nn.Linear):
    """An `nn.Linear` holding bf16 (or fp16) weights whose forward runs in float32.

    forward(x [..., in] bf16) -> [..., out] bf16 equals `F.linear(x, weight, bias)` up to summation order: it
    is `F.linear(x.float(), weight.float(), bias.float()).to(x.dtype)`. The float32 copies of weight and bias are
    made on first use and remade whenever the bf16 parameters change in place (their `_version` moves), so an
    optimizer step or a `load_state_dict` is never served stale weights. They are not part of the state dict.
    """

    def _fp32(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        ver = (self.weight._version, self.weight.data_ptr(),
               None if self.bias is None else (self.bias._version, self.bias.data_ptr()))
        if getattr(self, "_fp32_ver", None) != ver:
            self._fp32_w = self.weight.detach().float()
            self._fp32_b = None if self.bias is None else self.bias.detach().float()
            self._fp32_ver = ver
        return self._fp32_w, self._fp32_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # training keeps the native op: the float32 copies carry no gradient back to the bf16 parameters
            return F.linear(x, self.weight, self.bias)
        w, b = self._fp32()
        return F.linear(x.float(), w, b).to(x.dtype)


def linears_via_fp32(model: nn.Module) -> int:
    """Make every bf16/fp16 `nn.Linear` of `model` compute in float32 (see `Fp32Linear`); returns how many.

    The modules keep their parameters (bf16) and state dict; each gains float32 copies of its weight and bias on
    first use (twice the linear weights' bf16 memory), so this is for inference on CPUs where `bf16_gemm_is_native()`
    is False. Only exact `nn.Linear` instances change: subclasses (quantized or LoRA layers) keep their forward.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__!r}")
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype in (torch.bfloat16, torch.float16):
            mod.__class__ = Fp32Linear
            n += 1
    return n


def apply_linears(model: nn.Module, mode: str) -> str:
    """Apply a `--linears` choice to `model` and return one line saying what happened (for the log).

    mode "fp32": every bf16/fp16 `nn.Linear` computes in float32 (`linears_via_fp32`); only for a bf16/fp16 model
    whose parameters are on the CPU, anything else raises (the switch would do nothing, or slow a GPU down). mode
    "native": nothing changes; the line warns when a bf16 model on this CPU runs emulated bf16 kernels, "" otherwise.
    """
    if mode not in ("native", "fp32"):
        raise ValueError(f"mode must be 'native' or 'fp32', got {mode!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__!r}")
    # a transformers model names its dtype; a bare module goes by its first parameter
    first = next(model.parameters())
    dtype, device = getattr(model, "dtype", None) or first.dtype, first.device
    cpu = device.type == "cpu"  # where the weights are, whatever a --device flag asked for
    if mode == "fp32":
        if dtype not in (torch.bfloat16, torch.float16) or not cpu:
            raise ValueError(f"--linears fp32 is for a bfloat16/float16 model on the CPU, got dtype {dtype} "
                             f"on {str(device)!r}")
        return f"--linears fp32: {linears_via_fp32(model)} linear layers compute in float32"
    if cpu and dtype == torch.bfloat16 and not bf16_gemm_is_native():
        return ("note: this CPU has no bf16 instructions, so bf16 linear layers run an emulated kernel (about 9x "
                "float32's time here); --linears fp32 computes them in float32, with bf16 activations and caches")
    return ""
