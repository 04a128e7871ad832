"""GGUF's quantized tensor blocks as `lora_jax.Quantized`, without dequantizing them.

The library knows quantization formats (`lora_jax.quant`: Q4_1, Q8_0, NF4); this module knows how
GGUF files lay those blocks out in bytes (llama.cpp's `block_q4_1` / `block_q8_0`: a float16 scale,
for Q4_1 a float16 minimum, then the packed codes)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lora_jax.quant import Quantized


def from_gguf_blocks(data, type_name: str, *, transposed: bool = False, dtype=np.float32) -> Quantized:
    """A `Quantized` from a GGUF tensor's raw blocks: `data` uint8 (*rows, bytes per row) as
    ``gguf.GGUFReader`` gives it (``tensor.data``), `type_name` "Q4_1" or "Q8_0" (the
    ``GGMLQuantizationType`` name). The logical array is the stored (*rows, n) one, or with its last
    two axes swapped when `transposed` (a GGUF (out, in) matrix as a Flax (in, out) kernel)."""
    fmt = str(type_name).rsplit(".", 1)[-1].lower()
    if fmt not in ("q4_1", "q8_0"):
        raise ValueError(f"GGUF type {type_name!r}: only Q4_1 and Q8_0 blocks are kept quantized")
    data = np.asarray(data)
    type_size = {"q4_1": 20, "q8_0": 34}[fmt]
    if data.dtype != np.uint8 or data.shape[-1] % type_size:
        raise ValueError(f"{fmt}: expected uint8 rows of whole {type_size}-byte blocks, got "
                         f"{data.dtype}{tuple(data.shape)}")
    blocks = data.reshape(*data.shape[:-1], data.shape[-1] // type_size, type_size)
    f16 = lambda b: np.ascontiguousarray(b).view(np.float16)[..., 0]
    if fmt == "q8_0":
        scale, offset, codes = f16(blocks[..., 0:2]), None, np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    else:
        scale, offset, codes = f16(blocks[..., 0:2]), f16(blocks[..., 2:4]), np.ascontiguousarray(blocks[..., 4:])
    arr = lambda a: None if a is None else jnp.asarray(a)
    return Quantized(codes=arr(codes), scale=arr(scale), offset=arr(offset), format=fmt,
                     out_dtype=np.dtype(dtype), transposed=transposed)
