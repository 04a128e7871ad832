"""The `LoRA` pytree node: a frozen weight plus a low-rank update, kept factored.

Orientation (kernel orientation, as Flax stores kernels). Every axis of `w` has a role:

* leading *batch* axes (e.g. the layer axis of a scan-stacked kernel), shared by `w`, `a`, `b`;
* then one role per remaining axis, given by the static string `roles`: ``"i"`` (input, the axes
  that `x` is contracted with in ``x @ w``) or ``"o"`` (output).

With ``I`` the product of the input axes and ``O`` the product of the output axes,

    a: (*batch, *in_axes, r)      b: (*batch, r, *out_axes)
    w_eff = w + scale · a @ b     (contracting r; axes put back in `w`'s own order)

So a Dense kernel (in, out) has ``roles="io"``, a scan-stacked one (L, in, out) the same ``roles``
with one batch axis, a DenseGeneral query kernel (d_model, heads, head_dim) ``roles="ioo"``, its
output kernel (heads, head_dim, d_model) ``roles="iio"``, and a conv kernel (kh, kw, c_in, c_out)
``roles="iiio"`` (as PEFT: ``a`` is a conv to r channels, ``b`` a 1×1 conv).

Because `roles` describes only the trailing axes, slicing a batch axis off (as `lax.scan` does) gives
a valid node again.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", as Hugging Face PEFT's
``use_dora``): a node with a magnitude ``m`` of shape (*batch, *out_axes) (`w`'s batch and output
axes, in `w`'s order) stands for

    w' = m ⊙ w_eff / ‖w_eff‖      ‖w_eff‖: the L2 norm over the input axes, per output unit

(PEFT's ``lora_magnitude_vector``, one entry per output feature). As PEFT does (``weight_norm.detach()``,
following the paper's section 4.3), the norm is a constant in the backward pass: gradients reach `m`,
`a` and `b` through ``m / ‖w_eff‖`` times the product, never through the norm. ``m`` is None on plain
LoRA nodes.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax import policy
from lora_jax.quant import dense


class LoRA(policy.Formable):
    """A frozen weight `w` and trainable factors `a`, `b`; behaves like ``w + scale·a@b``, or with
    a DoRA magnitude `m` (trainable too) like ``m ⊙ (w + scale·a@b) / ‖w + scale·a@b‖``.

    Inside a function transformed by `lora_jax.wrap`, a `LoRA` acts as an array of `w`'s shape and
    dtype. Products with it run factored; anything else materialises (with a warning). `w` may be
    a `lora_jax.Quantized` (QLoRA): the product dequantizes it where it runs.
    """

    w: Any
    a: Any
    b: Any
    scale: float = eqx.field(static=True)
    roles: str = eqx.field(static=True)
    dropout: float = eqx.field(static=True, default=0.0)
    m: Any = None  # DoRA's magnitude (*batch, *out_axes); None: plain LoRA (no leaf, as before)

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def num_batch_axes(self) -> int:
        return np.ndim(self.w) - len(self.roles)

    @property
    def num_adapters(self) -> int | None:
        """K for a node holding K stacked adapters (`lora_jax.stack`: `a`, `b`, `m` carry an adapter
        axis right after `w`'s batch axes, `w` is shared); None for a single adapter. Read from the
        shapes, so under `jax.vmap` over that axis the node is a single adapter again."""
        if self.w is None or self.a is None:  # a half from `split`: `w`'s batch axes unknown
            return None
        extra = np.ndim(self.a) - (self.num_batch_axes + self.roles.count("i") + 1)
        return int(self.a.shape[self.num_batch_axes]) if extra == 1 else None

    def delta(self, dtype=jnp.float32):
        """``scale · a @ b`` in `w`'s shape, computed in `dtype`."""
        return _delta(self.a, self.b, self.scale, self.roles, self.num_batch_axes, dtype)

    @property
    def is_dora(self) -> bool:
        return self.m is not None

    def weight_norm(self, dtype=jnp.float32):
        """DoRA's ``‖w + scale·a@b‖`` over the input axes, (*batch, *out_axes), without forming the
        adapted weight; under `jax.lax.stop_gradient` (see the module docstring)."""
        return lax.stop_gradient(_factored_norm(dense(self.w, dtype), self.a, self.b, self.scale,
                                                self.roles, self.num_batch_axes, dtype))

    def column_scale(self, dtype=jnp.float32):
        """DoRA's ``m / ‖w_eff‖``, (*batch, *out_axes): the factor of each output unit."""
        return self.m.astype(dtype) / self.weight_norm(dtype)

    def as_array(self):
        """``w + scale·a@b`` (DoRA: times ``m / ‖·‖``), without the materialisation warning
        (`lora_jax.policy`)."""
        return merge_node(self)

    def materialise_message(self, what: str, why: str) -> str:
        return (f"LoRA weight of shape {tuple(self.w.shape)} (roles {self.roles!r}) is materialised "
                f"for {what}, {why}: this forms the full weight and its gradient.")

    def check_formable(self, what: str) -> None:
        if self.num_adapters is not None:
            raise ValueError(_STACKED.format(k=self.num_adapters, shape=tuple(self.w.shape), what=what))

    @property
    def __jax_array__(self):
        # jax.numpy takes an object with `__jax_array__` for an array and calls it: outside `wrap`
        # that call raises one clear error instead of a failure deep inside the caller ("astype
        # requires ndarray or scalar arguments"). Inside `wrap` the attribute must not exist: quax
        # (through `equinox.is_array_like`) would take the node for a plain array.
        if policy.inside_wrap():
            raise AttributeError("__jax_array__")
        return self._refuse_coercion

    def __array__(self, dtype=None, copy=None):  # NumPy's coercion (np.asarray, jax.device_put)
        self._refuse_coercion()

    def __getitem__(self, index):  # Flax NNX reads a Variable's array as `variable[...]`
        self._refuse_coercion()

    def _refuse_coercion(self):
        raise TypeError(_OUTSIDE_WRAP.format(shape=tuple(self.w.shape)))


_OUTSIDE_WRAP = ("a lora_jax.LoRA node (weight {shape}) was used as an array outside lora_jax.wrap: "
                 "run the function that uses the adapted parameters through lora_jax.wrap "
                 "(Linen: lora_jax.wrap(lambda p, x: model.apply({{'params': p}}, x))(adapted, x); "
                 "Flax NNX: graphdef, state = nnx.split(model), then "
                 "lora_jax.wrap(lambda st, x: nnx.merge(graphdef, st)(x))(adapted_state, x)), "
                 "or lora_jax.merge the tree into plain weights first")


_STACKED = ("a LoRA node holding {k} stacked adapters (weight {shape}) has no single merged weight, "
            "so {what} cannot run on it: products with it run per row (`lora_adapter_ids`); "
            "`lora_jax.unstack` it to merge or run each adapter")


def merge_node(node: LoRA):
    """``w + scale·a@b`` computed in float32 (or wider) and cast back to `w`'s dtype. A quantized
    `w` (`lora_jax.quant.Quantized`) is dequantized: the result is a float array of its dtype.
    A DoRA node gives ``m ⊙ w_eff / ‖w_eff‖`` (the norm over the input axes, computed from the
    formed ``w_eff`` and under `stop_gradient`, as in the factored product)."""
    node.check_formable("merging")
    compute = jnp.promote_types(jnp.float32, node.w.dtype)
    w_eff = dense(node.w, compute) + node.delta(compute)
    if node.is_dora:
        nb = node.num_batch_axes
        ins = tuple(nb + k for k, role in enumerate(node.roles) if role == "i")
        norm = lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(w_eff), axis=ins, keepdims=True)))
        w_eff = w_eff * (jnp.expand_dims(node.m.astype(compute), ins) / norm)
    return w_eff.astype(node.w.dtype)


def _factored_norm(w, a, b, scale, roles, num_batch, dtype):
    """``‖w + scale·a@b‖`` over the input axes, per output unit, from ``‖w_j‖²``, the cross term
    ``2·scale·Σ_r (aᵀw)_rj b_rj`` and ``scale²·Σ_rr' b_rj (aᵀa)_rr' b_r'j``: rank-sized products
    with `w` (r×O) and `a` (r×r), never the adapted weight. (Cancellation can lose digits where
    ``w_eff`` is much smaller than `w`; the squared norm is clipped at 0.)"""
    w_spec, a_spec, b_spec = axis_letters(roles, num_batch)
    col = b_spec.replace("R", "")  # batch + output letters: the norm's axes
    a2 = a_spec.replace("R", "r")  # a second rank letter
    hi = jax.lax.Precision.HIGHEST
    w, a, b = w.astype(dtype), a.astype(dtype), b.astype(dtype)
    ww = jnp.einsum(f"{w_spec},{w_spec}->{col}", w, w, precision=hi)
    aw = jnp.einsum(f"{a_spec},{w_spec}->{b_spec}", a, w, precision=hi)
    gram = jnp.einsum(f"{a_spec},{a2}->{a_spec[:num_batch]}Rr", a, a, precision=hi)
    gb = jnp.einsum(f"{a_spec[:num_batch]}Rr,{b_spec.replace('R', 'r')}->{b_spec}", gram, b, precision=hi)
    s = jnp.asarray(scale, dtype)
    sq = ww + jnp.sum((2 * s * aw + s * s * gb) * b, axis=num_batch)
    return jnp.sqrt(jnp.maximum(sq, 0))


def axis_letters(roles: str, num_batch: int):
    """Einsum letters for `w`, `a` and `b` of a node with these roles."""
    letters = "ABCDEFGHIJKLMNOPQSTUVWXYZ"  # no R: r is the rank
    w = letters[: num_batch + len(roles)]
    batch = w[:num_batch]
    ins = "".join(c for c, role in zip(w[num_batch:], roles) if role == "i")
    outs = "".join(c for c, role in zip(w[num_batch:], roles) if role == "o")
    return w, batch + ins + "R", batch + "R" + outs


def _delta(a, b, scale, roles, num_batch, dtype):
    w_spec, a_spec, b_spec = axis_letters(roles, num_batch)
    ab = jnp.einsum(f"{a_spec},{b_spec}->{w_spec}", a.astype(dtype), b.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)
    return ab * jnp.asarray(scale, dtype)


def factor_shapes(shape, roles: str, rank: int):
    """Shapes of `a` and `b` for a weight of `shape` with these roles."""
    nb = len(shape) - len(roles)
    batch, tail = tuple(shape[:nb]), shape[nb:]
    ins = tuple(d for d, role in zip(tail, roles) if role == "i")
    outs = tuple(d for d, role in zip(tail, roles) if role == "o")
    return batch + ins + (rank,), batch + (rank,) + outs


def magnitude_shape(shape, roles: str) -> tuple:
    """Shape of a DoRA magnitude `m` for a weight of `shape`: its batch and output axes."""
    nb = len(shape) - len(roles)
    return tuple(shape[:nb]) + tuple(d for d, role in zip(shape[nb:], roles) if role == "o")


def fan_in_out(shape, roles: str):
    nb = len(shape) - len(roles)
    tail = shape[nb:]
    fan_in = math.prod(d for d, role in zip(tail, roles) if role == "i")
    fan_out = math.prod(d for d, role in zip(tail, roles) if role == "o")
    return fan_in, fan_out


def is_lora(x) -> bool:
    return isinstance(x, LoRA)
