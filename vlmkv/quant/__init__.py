"""Numeric primitives: uniform quantization, bit packing, Walsh-Hadamard transform.

Nothing here imports `transformers`; everything works on plain `torch` tensors.
"""
from .hadamard import fwht, fwht_inverse, hadamard_block_size, hadamard_matrix
from .packing import pack_bits, unpack_bits
from .uniform import QTensor, QuantSpec, dequantize, quantize, saturate, SUPPORTED_BITS

__all__ = [
    "QTensor", "QuantSpec", "SUPPORTED_BITS", "quantize", "dequantize", "saturate",
    "pack_bits", "unpack_bits", "fwht", "fwht_inverse", "hadamard_matrix", "hadamard_block_size",
]
