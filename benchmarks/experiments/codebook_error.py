"""How much error a codebook format leaves against symmetric groups, on SmolLM2's Hadamard-rotated keys and values
(what `auto` stores): squared error over the tensors' energy, every layer, 1,024 tokens of the Debian licence texts.

    python benchmarks/experiments/codebook_error.py

Found (the numbers `vlmkv/policies/auto.py` quotes): 2 bits, codebook 0.106 / 0.114 (keys / values) at 2.25 bits an
element against 0.116 / 0.121 for symmetric groups of 32 at 2.5; 4 bits, 0.0086 / 0.0091 at 4.25 against
0.0066 / 0.0073 at 4.5.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vlmkv  # noqa: E402
from long_fidelity import corpus  # noqa: E402
from vlmkv.quant import QuantSpec, dequantize, fwht, quantize  # noqa: E402

SPECS = {"codebook-2, a norm a head vector": QuantSpec(2, 64, zero_point="none", codebook="lloyd-max"),
         "symmetric-2, groups of 32 (clip 0.9)": QuantSpec(2, 32, 0.9, zero_point="none"),
         "codebook-4, a norm a head vector": QuantSpec(4, 64, zero_point="none", codebook="lloyd-max"),
         "symmetric-4, groups of 32": QuantSpec(4, 32, zero_point="none")}


@torch.no_grad()
def main(tokens: int = 1024) -> None:
    model, tok = vlmkv.load_model("smollm2-135m")
    ids = tok(corpus(None), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :tokens]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, **vlmkv.cache_kwargs(cache), use_cache=True)
    print("| format | bits/element | keys | values |\n|---|---:|---:|---:|")
    for name, spec in SPECS.items():
        errs = []
        for kind in ("keys", "values"):
            num = den = 0.0
            for layer in cache.layers:
                x = fwht(getattr(layer, kind).float())
                num += float(((dequantize(quantize(x, spec), torch.float32) - x) ** 2).sum())
                den += float((x ** 2).sum())
            errs.append(num / den)
        bits = quantize(torch.zeros(1, 1, 1, 64), spec).nbytes() * 8 / 64
        print(f"| {name} | {bits:.2f} | {errs[0]:.4f} | {errs[1]:.4f} |")


if __name__ == "__main__":
    main()
