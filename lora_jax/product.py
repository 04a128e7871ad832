"""The factored product ``x@w + scale·(x@a)@b`` and its hand-written reverse-mode rule.

A DoRA node's product is that product with each output unit scaled by ``m / ‖w_eff‖``
(`_dora_scaled`, outside the custom VJP: plain autodiff of one elementwise multiply, the norm a
constant), so its adapted weight is never formed either.

`factored_dot` runs a `dot_general` with a `LoRA` operand as two rank-sized einsums added to the
frozen product, laid out as ``dot_general(x, w)`` would be, for any batch and contracting dims;
`quantized_dot` runs one with a frozen `Quantized` operand. Both are `jax.custom_vjp`s: see
`_factored_product` for why (the step's memory stays that of a frozen model) and `dequantize_at`
for how a quantized weight is kept from being dequantized once for the whole step.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from lora_jax import policy
from lora_jax._compat import multiply_reduce_last
from lora_jax.node import LoRA, _factored_norm
from lora_jax.quant import Quantized, dense


def adapter_input(x, node: LoRA):
    """PEFT's lora_dropout on the adapter's input, when the wrapped call was given a key."""
    if node.dropout == 0.0:
        return x
    key = policy.next_dropout_key()
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - node.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - node.dropout), 0).astype(x.dtype)


def _letters():
    return iter(string.ascii_letters)


def factored_dot(x, node: LoRA, x_contract, l_contract, x_batch, l_batch, lora_is_rhs, params):
    """``dot_general(x, w) + scale·(x@a)@b`` (or ``… + scale·(x@bᵀ)@aᵀ``), laid out as
    ``dot_general(x, w)`` would be. Callers have checked that the product contracts exactly the
    node's "i" (or exactly its "o") axes.

    The adapter path is written as einsums over shared axis letters, so any batch/contracting dims
    work; `_factored_product` runs them.
    """
    nb = node.num_batch_axes
    ins = {nb + k for k, role in enumerate(node.roles) if role == "i"}
    outs = {nb + k for k, role in enumerate(node.roles) if role == "o"}
    first, second_axes = ("a", outs) if set(l_contract) == ins else ("b", ins)

    fresh = _letters()
    x_spec = [next(fresh) for _ in range(x.ndim)]
    w_spec = [None] * node.w.ndim
    for xd, ld in zip(x_contract, l_contract):
        w_spec[ld] = x_spec[xd]
    for xd, ld in zip(x_batch, l_batch):
        w_spec[ld] = x_spec[xd]
    for d in range(node.w.ndim):
        if w_spec[d] is None:
            w_spec[d] = next(fresh)
    r = next(fresh)

    x_free = [x_spec[d] for d in range(x.ndim) if d not in x_contract and d not in x_batch]
    l_free = [w_spec[d] for d in range(node.w.ndim) if d not in l_contract and d not in l_batch]
    batch = [x_spec[d] for d in x_batch]
    out_spec = batch + (x_free + l_free if lora_is_rhs else l_free + x_free)

    lead = w_spec[:nb]
    a_spec = lead + [w_spec[d] for d in sorted(ins)] + [r]
    b_spec = lead + [r] + [w_spec[d] for d in sorted(outs)]
    other = {w_spec[d] for d in second_axes}
    t_spec = [c for c in out_spec if c not in other] + [r]
    first_spec, first_arr = (a_spec, node.a) if first == "a" else (b_spec, node.b)
    second_spec, second_arr = (b_spec, node.b) if first == "a" else (a_spec, node.a)

    def base(x, w):  # a quantized `w` is dequantized here, where the product runs
        w = dequantize_at(w, x)
        return lax.dot_general_p.bind(*((x, w) if lora_is_rhs else (w, x)), **params)

    j = "".join
    k_spec = j(lead + [w_spec[d] for d in sorted(outs)])  # DoRA's column scale: batch + out axes
    scale_of = LoRA.column_scale
    if node.num_adapters is not None:  # stacked adapters: each row of x gets its own factors
        first_arr, second_arr, scale_of = _rows(node, x, x_contract, x_batch, first_arr, second_arr)
        row = x_spec[0]
        first_spec, second_spec, k_spec = [row] + first_spec, [row] + second_spec, row + k_spec
    specs = _Specs(j(x_spec), j(w_spec), j(first_spec), j(t_spec), j(second_spec), j(out_spec))
    if node.is_dora and first == "b":  # x contracted with w's output axes: scale x's columns
        x = _dora_scaled(x, node, k_spec, specs.x, scale_of)
    xd = adapter_input(x, node)
    product = _factored_product(base, specs, node.scale, params.get("precision"))
    out, = product(x, None if xd is x else xd, node.w, first_arr, second_arr)
    if node.is_dora and first == "a":
        out = _dora_scaled(out, node, k_spec, specs.out, scale_of)
    return out


def _rows(node: LoRA, x, x_contract, x_batch, first, second):
    """A stacked node's factors gathered per row of `x` (its leading axis; `lora_adapter_ids`
    gives each row's adapter), a row with id −1 (or ≥ K) getting zeros: ``(first, second,
    column_scale)`` with a leading row axis, rank-sized per row. The DoRA column scale is taken
    per adapter (K × out) and then gathered, 1 on base rows."""
    ids = policy.adapter_ids()
    k = k_count = node.num_adapters
    if ids is None:
        raise ValueError(f"a LoRA node holding {k} stacked adapters (weight {tuple(node.w.shape)}) "
                         "needs `lora_adapter_ids` (one adapter index per batch row) in the wrapped "
                         "call; or `lora_jax.unstack` the tree and run one adapter")
    if node.num_batch_axes or 0 in x_contract or 0 in x_batch or x.ndim < 2 or x.shape[0] != ids.shape[0]:
        raise ValueError(f"stacked adapters run products whose input's leading axis is the batch of "
                         f"{ids.shape[0]} rows `lora_adapter_ids` indexes; this product has input "
                         f"{tuple(x.shape)} (contracting {tuple(x_contract)}) with weight "
                         f"{tuple(node.w.shape)} (roles {node.roles!r}, {node.num_batch_axes} stacked "
                         "layer axes not sliced off by a scan)")
    live = (ids >= 0) & (ids < k)
    index = jnp.where(live, ids, 0)

    def take(v, empty=0.0):
        got = jnp.take(v, index, axis=0)
        return jnp.where(live.reshape((-1,) + (1,) * (got.ndim - 1)), got, jnp.asarray(empty, got.dtype))

    def column_scale(node, dtype):
        # one adapter at a time, as `LoRA.column_scale` computes it: a row's scale then rounds
        # exactly as its adapter's alone (a vmap would batch the einsums, summing in another order)
        w = dense(node.w, dtype)
        per = jnp.stack([node.m[k].astype(dtype) / lax.stop_gradient(
            _factored_norm(w, node.a[k], node.b[k], node.scale, node.roles, 0, dtype)) for k in range(k_count)])
        return take(per, 1.0)

    return take(first), take(second), column_scale


def _dora_scaled(v, node: LoRA, k_spec: str, v_spec: str, scale_of=LoRA.column_scale):
    """`v` times DoRA's ``m / ‖w_eff‖`` (`LoRA.column_scale`, its norm under `stop_gradient`)
    along the axes `k_spec` names in `v_spec`, in float32 (or wider), cast back to `v`'s dtype.

    On the product's output (x contracted with the input axes) this is ``x@w' = (x@w_eff) ⊙ k``;
    on its input (contracted with the output axes, ``x@w'ᵀ``) ``(x ⊙ k)@w_effᵀ``. The gradient of
    `m` needs the unscaled value, so autodiff keeps it: one activation-sized residual more than
    plain LoRA (PEFT's DoRA keeps it too)."""
    acc = jnp.promote_types(v.dtype, jnp.float32)
    k = _along(scale_of(node, acc), k_spec, v_spec)
    return (v.astype(acc) * k).astype(v.dtype)


class _Specs(NamedTuple):
    """Einsum letters: ``base = x·w``, ``t = x·first`` (over `x`'s contracted axes),
    ``delta = t·second``; `out` is laid out as ``dot_general(x, w)`` would be."""
    x: str
    w: str
    first: str
    t: str
    second: str
    out: str


def _along(v, spec: str, target: str):
    """`v` (axes named by `spec`) transposed and broadcastable to axes named by `target`."""
    v = jnp.transpose(v, [spec.index(c) for c in target if c in spec])
    return lax.expand_dims(v, [k for k, c in enumerate(target) if c not in spec])


def _factored_product(base, s: _Specs, scale, precision):
    """``f(x, xd, w, first, second) = base(x, w) + scale·(xd·first)·second``, with its own VJP.

    Autodiff of ``base + t@second`` keeps two activation-sized buffers alive per product (XLA
    fuses the add into every consumer, forward and backward, so both summands become residuals),
    and transposes the adapter products into slow transposed-copy dots. Here:

    * forward: ``delta`` is a multiply-reduce over the rank axis, which XLA fuses with the add
      (and its consumers): only ``base`` and the rank-sized ``t`` are live, as in a frozen step;
    * residuals: ``x``, ``w``, the factors and ``t`` (no activation-sized value of our own); a
      quantized `w` is a residual as its blocks, and `base` dequantizes it where it runs;
    * backward: ``u = g·secondᵀ`` (rank-sized), ``d_second = tᵀg``, ``d_first = xdᵀ(s·u)`` as
      direct einsums, and ``dx = g·wᵀ + (s·u)·firstᵀ`` with again a fused multiply-reduce.

    ``xd`` is the adapter's (dropped-out) input, or None when it is `x`. A cotangent is formed
    only for perturbed inputs (``symbolic_zeros``): the frozen `w` gets none, and if `w` is
    differentiated after all, its true gradient ``dot_general``ᵀ(x, g) is returned.
    """
    def einsum(spec, *ops, like=None):
        """With `like`: a cotangent, given its primal's sharding (as JAX's own transpose rules do;
        needed when the contracted axes are sharded, e.g. the data axis)."""
        sharding = None if like is None else jax.typeof(like).sharding
        if sharding is not None and sharding.mesh.empty:
            sharding = None
        return jnp.einsum(spec, *ops, precision=precision, out_sharding=sharding)

    def adapter_t(xd, first):
        t = einsum(f"{s.x},{s.first}->{s.t}", xd, first)
        return t * jnp.asarray(scale, t.dtype)

    def mul_reduce(u, u_spec, v, v_spec, out_spec):
        """``einsum(u, v)`` over the rank axis only, as a multiply-reduce that XLA fuses with
        the add it feeds (a dot would give an activation-sized buffer of its own)."""
        r = s.t[-1]
        acc = jnp.promote_types(jnp.promote_types(u.dtype, v.dtype), jnp.float32)
        target = out_spec + r
        u, v = _along(u.astype(acc), u_spec, target), _along(v.astype(acc), v_spec, target)
        shape = tuple(max(m, n) for m, n in zip(u.shape, v.shape))[:-1]
        return multiply_reduce_last(u, v, shape), acc

    def combine(base_out, t, second):
        delta, acc = mul_reduce(t, s.t, second, s.second, s.out)
        return (base_out.astype(acc) + delta).astype(base_out.dtype)

    @jax.custom_vjp
    def product(x, xd, w, first, second):
        t = adapter_t(x if xd is None else xd, first)
        return (combine(base(x, w), t, second),)

    def fwd(x, xd, w, first, second):
        vals = [_primal_value(v) for v in (x, xd, w, first, second)]
        x_, xd_, w_, first_, second_ = vals
        t = adapter_t(x_ if xd_ is None else xd_, first_)
        out = combine(base(x_, w_), t, second_)
        wanted = tuple(_perturbed(v) for v in (x, xd, w, first, second))
        return (out,), (_Static(wanted), x_, xd_, w_, first_, second_, t)

    def bwd(res, cts):
        wanted, x, xd, w, first, second, t = res
        (g,) = cts
        if isinstance(g, SymbolicZero):
            return (None,) * 5
        want_x, want_xd, want_w, want_first, want_second = wanted.value
        xd_is_x = xd is None
        su = None
        if want_x or want_xd or want_first:
            u = einsum(f"{s.out},{s.second}->{s.t}", g, second, like=t)
            su = u * jnp.asarray(scale, u.dtype)
        d_second = (einsum(f"{s.t},{s.out}->{s.second}", t, g, like=second).astype(second.dtype)
                    if want_second else None)
        # rank-sized operand first: XLA:CPU then transposes it, not the activation-sized one
        d_first = (einsum(f"{s.t},{s.x}->{s.first}", su, x if xd_is_x else xd, like=first)
                   .astype(first.dtype) if want_first else None)
        dx = dxd = None
        quantized = isinstance(w, Quantized)
        if want_x and quantized:
            # dequantize again, once the cotangent exists: not merged with the forward's
            # dequantization, so no float copy of `w` lives across the step
            w = dequantize_at(w, g)
        if want_x:  # `x`-side operand first: XLA:CPU then uses `w` in place, not a transposed copy
            dx = _matmul(g, s.out, w, s.w, s.x, precision, jax.typeof(x).sharding)
            dx = einsum(f"{s.out},{s.w}->{s.x}", g, w, like=x) if dx is None else dx
        if (want_x and xd_is_x) or want_xd:
            ddelta, acc = mul_reduce(su, s.t, first, s.first, s.x)
            if xd_is_x:
                dx = dx.astype(acc) + ddelta
            else:
                dxd = ddelta.astype(xd.dtype)
        dx = None if dx is None else dx.astype(x.dtype)
        dw = (einsum(f"{s.x},{s.out}->{s.w}", x, g, like=w).astype(w.dtype)
              if want_w and not quantized else None)  # quantized blocks get no gradient
        return dx, dxd, dw, d_first, d_second

    product.defvjp(fwd, bwd, symbolic_zeros=True)
    return product


def _matmul(l, l_spec, r, r_spec, out_spec, precision, sharding):
    """``einsum(l, r)`` as a 2-D ``l[M,K]·r[N,K]ᵀ`` (or ``r[K,N]``) when each operand's axes form
    contiguous groups, else None. XLA:CPU takes a 2-D kernel with either layout in place, but
    copies a transposed one of higher rank (e.g. a (d_model, heads, head_dim) attention kernel)."""
    k = "".join(c for c in l_spec if c in r_spec)
    m, n = l_spec[:len(l_spec) - len(k)], r_spec.replace(k, "")
    if (any(c in out_spec for c in k) or l_spec != m + k or out_spec != m + n
            or r_spec not in (n + k, k + n) or not sharding.mesh.empty):
        return None
    size = lambda v, letters, spec: math.prod(v.shape[spec.index(c)] for c in letters)
    l2 = l.reshape(size(l, m, l_spec), size(l, k, l_spec))
    r2 = r.reshape(size(r, r_spec[:len(r_spec) - len(k)] if r_spec == n + k else k, r_spec), -1)
    contract = 1 if r_spec == n + k else 0
    dtype = jnp.promote_types(l.dtype, r.dtype)  # as einsum would
    out = lax.dot_general(l2.astype(dtype), r2.astype(dtype), (((1,), (contract,)), ((), ())),
                          precision=precision)
    return out.reshape([l.shape[l_spec.index(c)] for c in m] + [r.shape[r_spec.index(c)] for c in n])


def dequantize_at(w, v):
    """`w` as a float array; a quantized one dequantized where `v` (the layer's input, or the
    cotangent in the backward pass) exists. The codes are xor-ed with a zero that XLA cannot
    prove zero (``(v₀ ≠ v₀) ∧ (v₀ = v₀)``, false for every float, NaN included), so XLA neither
    hoists the dequantization ahead of the layer, keeping every layer's float weight live at once,
    nor merges the backward's dequantization with the forward's, which would keep the float weight
    alive across the step. (`lax.optimization_barrier` does neither on XLA:CPU, which removes
    barriers before CSE.)"""
    if not isinstance(w, Quantized):
        return w
    v0 = jnp.ravel(v)[0]
    never = (v0 != v0) & (v0 == v0)

    def tie(a):  # every leaf (scales too: their broadcasts would be hoisted and shared otherwise)
        if a is None:
            return None
        if jnp.issubdtype(a.dtype, jnp.integer):
            return a ^ never.astype(a.dtype)
        bits = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
        return lax.bitcast_convert_type(lax.bitcast_convert_type(a, bits) ^ never.astype(bits), a.dtype)

    return dataclasses.replace(w, codes=tie(w.codes), scale=tie(w.scale),
                               offset=tie(w.offset)).dequantize()


def _primal_value(v):
    """The value of a custom_vjp primal (a pytree of `CustomVJPPrimal`s: `w` may be `Quantized`)."""
    return jax.tree.map(lambda p: p.value, v, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))


def _perturbed(v) -> bool:
    leaves = jax.tree.leaves(v, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))
    return any(p.perturbed for p in leaves)


@jax.tree_util.register_static
class _Static:
    """A Python value carried through residuals as pytree structure, not as an array."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Static) and self.value == other.value

    def __hash__(self):
        return hash(self.value)


def quantized_dot(lhs, rhs, params):
    """`dot_general` with a frozen `Quantized` operand: dequantized where it runs, forward and again
    for the backward's cotangent, so the step keeps the blocks, not a float weight."""
    q_is_rhs = isinstance(rhs, Quantized)
    x, q = (lhs, rhs) if q_is_rhs else (rhs, lhs)
    x_aval = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    def run(x, w):
        return lax.dot_general_p.bind(*((x, w) if q_is_rhs else (w, x)), **params)

    @jax.custom_vjp
    def product(x, q):
        return run(x, q.dequantize())

    def fwd(x, q):
        return run(x, dequantize_at(q, x)), q  # residual: the blocks, not a float weight

    def bwd(q, g):
        w = dequantize_at(q, g)  # recomputed once g exists (not merged with the forward's)
        dx, = jax.linear_transpose(lambda x_: run(x_, w), x_aval)(g)
        return dx, None

    product.defvjp(fwd, bwd)
    return product(x, q)
