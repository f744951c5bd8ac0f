"""Every stored format the fused kernels take, for the backend grids (tests/test_backends.py, tests/test_gpu.py):
what the registered policies store at their defaults and across their `--pareto` grids, and the edges between."""
from vlmkv.quant import QuantSpec


def formats(d: int) -> list[tuple[str, QuantSpec]]:
    """(id, spec) of per-token formats over rows of d channels."""
    out = []
    for bits in (2, 4, 8):
        for g in sorted(g for g in {16, 32, 64, 128, d} if d % g == 0):  # groups of 16..128 and the head dim
            for zp in ("int16", "int8", "none"):
                out.append((f"{bits}b-g{g}-{zp}", QuantSpec(bits, g, 0.9 if bits == 2 else 1.0, zero_point=zp)))
    third = d // 3 // 8 * 8 or 1
    bounds = (0, third, d - third // 2, d)  # uneven groups (SKVQ's clusters), with a clip ratio each
    out.append(("2b-uneven-clips", QuantSpec(2, 32, bounds=bounds, clips=(1.0, 0.9, 0.8))))
    out.append(("4b-uneven-int8", QuantSpec(4, 32, bounds=(0, 5, d), zero_point="int8")))
    out.append(("ternary", QuantSpec(2, min(32, d), levels=3)))
    out.append(("ternary-uneven", QuantSpec(2, 32, bounds=bounds, clips=(0.9, 1.0, 0.8), levels=3)))
    return list(dict(out).items())


def decode_pairs(d: int) -> list[tuple[str, QuantSpec, QuantSpec]]:
    """(id, key spec, value spec) pairs: each policy's pairing, and per-channel keys beside each value format."""
    f = dict(formats(d))
    g = min(32, d)
    return [
        ("auto-2", f[f"2b-g{g}-none"], f[f"2b-g{g}-none"]),
        ("auto-4-8", f[f"4b-g{g}-none"], f[f"8b-g{g}-none"]),
        ("rtn-int8", f[f"4b-g{g}-int8"], f[f"2b-g{g}-int8"]),
        ("rtn-g-d", f[f"2b-g{d}-int16"], f[f"4b-g{d}-int16"]),
        ("kivi-2", QuantSpec(2, 32, axis="channel"), f[f"2b-g{g}-int16"]),
        ("kivi-4-ternary", QuantSpec(4, 16, axis="channel"), f["ternary"]),
        ("skvq", f["2b-uneven-clips"], f["ternary-uneven"]),
        ("mixed", f["4b-uneven-int8"], f[f"8b-g{g}-none"]),
        # codebooks (auto's 2- and 4-bit tokens, the TurboQuant peer): a norm per head vector and Lloyd-Max levels
        ("codebook-2", codebook(2, d), codebook(2, d)),
        ("codebook-4-8", codebook(4, d), f[f"8b-g{g}-none"]),
        ("codebook-8-g32", codebook(8, g), codebook(4, g)),
    ]


def codebook(bits: int, group: int) -> QuantSpec:
    return QuantSpec(bits, group, zero_point="none", codebook="lloyd-max")
