"""Quantized frozen weights for QLoRA: stored in blocks, dequantized where they are used.

`Quantized` is a quax `ArrayValue` that stands for a float array of its logical shape. It can be
the frozen `w` of a `LoRA` node (the factored product dequantizes it inside the product, forward
and again in the backward pass, so no float copy of the weight is a residual), or stand alone in a
parameter tree under `lora_jax.wrap` (products, embedding lookups and `.T` stay quantized; any
other use dequantizes with a `LoRAMaterializationWarning`).

Formats (blocks run along the last axis of the stored array):

* ``"nf4"``: QLoRA's 4-bit NormalFloat (Dettmers et al., 2023): blocks of 64, a float32 absmax
  per block, codes indexing `NF4_CODEBOOK`, packed two per uint8 (first element in the high
  nibble, as bitsandbytes). Double quantization of the absmax scales is not implemented
  (it would save a further 0.37 bits per weight).
* ``"q4_1"``: GGUF's Q4_1: blocks of 32, float16 scale `d` and minimum `m`, ``x = d·q + m`` with
  q in 0..15 packed two per uint8 (elements 0-15 in the low nibbles, 16-31 in the high ones).
* ``"q8_0"``: GGUF's Q8_0: blocks of 32, float16 scale `d`, ``x = d·q`` with int8 q.

Dequantization is bit-exact against ``gguf.quants.dequantize`` (float32): ``d·q`` is exact in
float32 (an 11-bit significand times a 4- or 8-bit integer), so a fused multiply-add rounds as
the two separate operations do.

`transposed` is a layout flag: the logical array is the stored one with its last two axes
swapped. A GGUF matrix (out, in), blocked along `in`, becomes a Flax kernel (in, out) this way
without a copy, and ``q.T`` of a 2-D `Quantized` flips the flag.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import policy

# QLoRA's NF4 code book (bitsandbytes' `create_normal_map(0.9677083, use_extra_value=True)`)
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# format: (block size, stored code bytes per block)
FORMATS = {"nf4": (64, 32), "q4_1": (32, 16), "q8_0": (32, 32)}


class Quantized(policy.Formable):
    """A frozen float array kept in quantized blocks (see the module docstring).

    `codes` has shape (*lead, n_blocks, code bytes), `scale` (and `offset`, Q4_1's minimum)
    (*lead, n_blocks), so slicing a leading axis (as `scan` over stacked layers does) gives a valid
    `Quantized` again. `pad` zeros were appended to the stored last axis to fill its last block.
    """

    codes: Any
    scale: Any
    offset: Any
    format: str = eqx.field(static=True)
    out_dtype: Any = eqx.field(static=True, default=np.dtype(np.float32))
    transposed: bool = eqx.field(static=True, default=False)
    pad: int = eqx.field(static=True, default=0)

    @property
    def block_size(self) -> int:
        return FORMATS[self.format][0]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        *lead, nb, _ = self.codes.shape
        return (*lead, nb * self.block_size - self.pad)

    def aval(self):
        shape = self.stored_shape
        if self.transposed:
            shape = (*shape[:-2], shape[-1], shape[-2])
        return jax.core.ShapedArray(shape, self.out_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored blocks (codes and scales)."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in (self.codes, self.scale, self.offset) if x is not None)

    def dequantize(self, dtype=None):
        """The float array (logical layout), in `dtype` (default: `out_dtype`), computed in float32."""
        dtype = self.out_dtype if dtype is None else dtype
        v = _block_values(self)  # (*lead, nb, block) float32
        v = v.reshape(*v.shape[:-2], -1)
        if self.pad:
            v = v[..., : v.shape[-1] - self.pad]
        v = v.astype(dtype)
        return jnp.swapaxes(v, -1, -2) if self.transposed else v

    def astype(self, dtype) -> "Quantized":
        """The same blocks, dequantizing to `dtype`."""
        return dataclasses.replace(self, out_dtype=np.dtype(dtype))

    def swap_last_axes(self) -> "Quantized":
        """The logical array with its last two axes swapped (no copy: a layout flag)."""
        if len(self.stored_shape) < 2:
            raise ValueError("swap_last_axes needs 2 or more axes")
        return dataclasses.replace(self, transposed=not self.transposed)

    def as_array(self):
        """The dequantized array, without the materialisation warning (`lora_jax.policy`)."""
        return self.dequantize()

    def materialise_message(self, what: str, why: str) -> str:
        return (f"quantized weight ({self.format}) of shape {tuple(self.shape)} is dequantized for "
                f"{what}, {why}: this forms the full float weight.")


def is_quantized(x) -> bool:
    return isinstance(x, Quantized)


def dense(w, dtype=None):
    """`w` as a plain array: dequantized if `Quantized` (in `dtype`, default its own), else as is
    (cast to `dtype` if given)."""
    if isinstance(w, Quantized):
        return w.dequantize(dtype)
    return w if dtype is None else w.astype(dtype)


def _block_values(q: Quantized):
    f32 = jnp.float32
    if q.format == "q8_0":
        return q.codes.astype(f32) * q.scale.astype(f32)[..., None]
    if q.format == "q4_1":
        c = jnp.concatenate([q.codes & 0x0F, q.codes >> 4], axis=-1).astype(f32)
        return c * q.scale.astype(f32)[..., None] + q.offset.astype(f32)[..., None]
    if q.format == "nf4":
        idx = jnp.stack([q.codes >> 4, q.codes & 0x0F], axis=-1).reshape(*q.codes.shape[:-1], -1)
        # a 16-way select, not a gather: elementwise, so XLA fuses it with the scaling (and users)
        codebook = [jnp.full(idx.shape, c, f32) for c in NF4_CODEBOOK]
        return jax.lax.select_n(idx.astype(jnp.int32), *codebook) * q.scale.astype(f32)[..., None]
    raise ValueError(f"unknown format {q.format!r}")


def quantize(w, format: str = "nf4", *, dtype=None) -> Quantized:
    """`w` (any float array of ndim ≥ 1) as a `Quantized` of `format` ("nf4", "q4_1" or "q8_0"),
    blocked along its last axis (padded with zeros to a whole block); it dequantizes to `dtype`
    (default: `w`'s dtype). Q4_1/Q8_0 quantize as ``gguf.quants.quantize`` does. Jit-able."""
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r}; choose one of {tuple(FORMATS)}")
    if isinstance(w, Quantized):
        raise ValueError("already quantized")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim < 1:
        raise ValueError(f"quantize needs a float array of ndim ≥ 1, got {w.dtype}{tuple(w.shape)}")
    dtype = np.dtype(w.dtype if dtype is None else dtype)
    block, _ = FORMATS[format]
    n = w.shape[-1]
    pad = -n % block
    x = w.astype(jnp.float32)
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    x = x.reshape(*x.shape[:-1], (n + pad) // block, block)
    offset = None
    if format == "nf4":
        absmax = jnp.abs(x).max(-1)
        normed = x / jnp.where(absmax == 0, 1.0, absmax)[..., None]
        mid = jnp.asarray((NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2)
        idx = jnp.searchsorted(mid, normed).astype(jnp.uint8)  # the nearest code
        codes = (idx[..., 0::2] << 4) | idx[..., 1::2]
        scale = absmax
    elif format == "q8_0":
        d = jnp.abs(x).max(-1, keepdims=True) / 127
        inv = jnp.where(d == 0, 0, 1 / jnp.where(d == 0, 1, d))
        v = x * inv
        codes = (jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)).astype(jnp.int8)  # round half away
        scale = d[..., 0].astype(jnp.float16)
    else:  # q4_1
        hi, lo = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
        d = (hi - lo) / 15
        inv = jnp.where(d == 0, 0, 1 / jnp.where(d == 0, 1, d))
        q = jnp.clip(jnp.trunc((x - lo) * inv + 0.5), 0, 15).astype(jnp.uint8)
        codes = q[..., : block // 2] | (q[..., block // 2:] << 4)
        scale, offset = d[..., 0].astype(jnp.float16), lo[..., 0].astype(jnp.float16)
    return Quantized(codes=codes, scale=scale, offset=offset, format=format, out_dtype=dtype, pad=pad)


def quantized_bytes(tree) -> int:
    """Bytes of every array in `tree`, `Quantized` leaves counted by their stored blocks."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _nf4_check():  # the code book is sorted, symmetric in range and holds an exact zero
    assert (np.diff(NF4_CODEBOOK) > 0).all() and NF4_CODEBOOK[7] == 0 and math.isclose(NF4_CODEBOOK[0], -1)


_nf4_check()
