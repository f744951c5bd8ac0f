"""Low-rank adapters (LoRA, Hu et al. 2021) for training the pocket VLM, and their merge for loading it.

Kept here (a few lines) rather than depending on `peft`: loading the shipped model only needs the merge,
W' = W + (alpha / r) * B @ A, with A: [r, in] and B: [out, r], so inference runs on plain `nn.Linear`s.
"""
from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x @ A^T @ B^T; the base layer is frozen, B starts at zero (identity at init)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be positive, got {r!r}")
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        base.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ (self.lora_B.t().to(x.dtype) * self.scale)


def add_lora(module: nn.Module, targets: tuple[str, ...], r: int = 16, alpha: float = 32.0) -> list[str]:
    """Wrap every `nn.Linear` under `module` whose attribute name is in `targets`; returns their qualified names."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    for n in names:
        parent, attr = (module.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) if "." in n else (module, n)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha))
    if not names:
        raise ValueError(f"targets must name linear layers of the module, got {targets!r}")
    return names


def lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """{"<name>.lora_A": A, "<name>.lora_B": B (already multiplied by alpha / r)} for every wrapped layer."""
    out = {}
    for n, m in module.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{n}.lora_A"] = m.lora_A.detach().clone()
            out[f"{n}.lora_B"] = (m.lora_B * m.scale).detach().clone()
    return out


def strip_lora(module: nn.Module) -> None:
    """Replace every `LoRALinear` by its base layer with the adapter merged in."""
    for n, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.base.weight += (m.lora_B * m.scale) @ m.lora_A
            parent, attr = (module.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) if "." in n else (module, n)
            setattr(parent, attr, m.base)


@torch.no_grad()
def merge_lora(module: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Add B @ A into the weights of the linear layers named in `state` (as written by `lora_state`).

    Returns the number of layers merged; a name that does not resolve to an `nn.Linear` is rejected.
    """
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    for n in names:
        lin = module.get_submodule(n)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"state must name linear layers, got {n!r} ({type(lin).__name__})")
        a, b = state[f"{n}.lora_A"].float(), state[f"{n}.lora_B"].float()
        lin.weight += (b @ a).to(lin.weight.dtype)
    return len(names)


@torch.no_grad()
def load_lora(module: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Set the adapters of every `LoRALinear` under `module` from `state` (as written by `lora_state`); returns
    how many were set.

    A stored adapter of rank r0 may go into a layer of rank r >= r0 (training on from a smaller adapter): it fills
    A's first r0 rows and B's first r0 columns, B's other columns are zero and A's other rows keep their random
    start, so the layer computes exactly what the stored adapter did (B' @ A' = B @ A) and the new ranks can learn.
    A layer missing from `state`, or a stored rank above the layer's, is rejected.
    """
    count = 0
    for n, m in module.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        if f"{n}.lora_A" not in state or f"{n}.lora_B" not in state:
            raise ValueError(f"state must hold lora_A and lora_B of every adapted layer, got none for {n!r}")
        a, b = state[f"{n}.lora_A"], state[f"{n}.lora_B"]
        r0, r = a.shape[0], m.lora_A.shape[0]
        if r0 > r or a.shape[1] != m.lora_A.shape[1] or b.shape != (m.lora_B.shape[0], r0):
            raise ValueError(f"state's adapter for {n!r} must have rank at most {r} and the layer's shape "
                             f"{tuple(m.lora_B.shape[:1])} x {tuple(m.lora_A.shape[1:])}, got A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}")
        m.lora_A[:r0].copy_(a)
        m.lora_B.zero_()
        m.lora_B[:, :r0].copy_(b / m.scale)  # stored multiplied by its own alpha / r; this layer multiplies by m.scale
        count += 1
    return count
