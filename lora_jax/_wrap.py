"""`wrap`: run a function on trees holding `LoRA` nodes, with products executed factored.

The engine is `quax` (a maintained custom-interpreter library): `LoRA` is a `quax.ArrayValue`, and
the rules below say how primitives act on it. Higher-order primitives (jit, scan, while, cond) are
quax's own; `remat` is added here. Every primitive without a rule materialises ``w + scale·a@b``
with a `LoRAMaterializationWarning` naming the primitive, or raises under ``strict=True``.
"""

from __future__ import annotations

import contextvars
import functools
import math
import string
import warnings
from typing import Callable, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import quax
from jax import lax
from jax._src.ad_checkpoint import remat_p
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import ArrayLike

from lora_jax.node import LoRA, merge_node
from lora_jax.quant import Quantized, dense


class LoRAMaterializationWarning(UserWarning):
    """A LoRA weight was materialised (``w + scale·a@b``) because no factored rule applies."""


class LoRAMaterializationError(TypeError):
    """Raised instead of `LoRAMaterializationWarning` under ``wrap(fn, strict=True)``."""


_STRICT = contextvars.ContextVar("lora_jax_strict", default=False)
_DROPOUT = contextvars.ContextVar("lora_jax_dropout", default=None)  # [key, counter] or None


def on_materialise(node, primitive: str | None, why: str = "which has no factored rule") -> None:
    what = f"primitive {primitive!r}" if primitive else "an operation"
    if isinstance(node, Quantized):
        msg = (f"quantized weight ({node.format}) of shape {tuple(node.shape)} is dequantized for "
               f"{what}, {why}: this forms the full float weight.")
    else:
        msg = (f"LoRA weight of shape {tuple(node.w.shape)} (roles {node.roles!r}) is materialised "
               f"for {what}, {why}: this forms the full weight and its gradient.")
    if _STRICT.get():
        raise LoRAMaterializationError(msg + " (strict=True)")
    warnings.warn(msg, LoRAMaterializationWarning, stacklevel=2)


def _materialise(x):
    if isinstance(x, LoRA):
        return merge_node(x)
    if isinstance(x, Quantized):
        return x.dequantize()
    return x


def wrap(fn: Callable, *, strict: bool = False) -> Callable:
    """`fn`, accepting `LoRA` nodes wherever it accepted arrays.

    Products with a `LoRA` operand (`dot_general` with any batch/contracting dims, hence `@`,
    `einsum`, Flax `Dense`/`DenseGeneral`/`Einsum`; `conv_general_dilated`; embedding lookups by
    `gather`) run as ``x@w + scale·(x@a)@b``: ``w + scale·a@b`` is never formed and, with `w`
    frozen, no gradient of `w`'s size exists. `jit`, `scan`, `while_loop`, `cond` and
    `checkpoint`/`remat` are traced through. Any other use of a LoRA operand materialises it with a
    `LoRAMaterializationWarning` naming the primitive; with ``strict=True`` it raises
    `LoRAMaterializationError` instead. Factored `dot_general`s carry their own reverse-mode rule
    (a `jax.custom_vjp`), so forward-mode `jax.jvp` through them raises JAX's custom_vjp error.

    The wrapped function takes one extra keyword, ``lora_dropout_key``: when given, each LoRA
    with ``dropout > 0`` drops its adapter input (PEFT's ``lora_dropout``) using a key folded from
    it; when omitted, no dropout is applied (evaluation). Inside `scan` bodies the layers of one
    call share a mask, since the body is traced once.
    """
    @functools.wraps(fn)
    def wrapped(*args, lora_dropout_key=None, **kwargs):
        strict_token = _STRICT.set(strict)
        drop_token = _DROPOUT.set(None if lora_dropout_key is None else [lora_dropout_key, 0])
        try:
            return _call_flat(fn, args, kwargs)
        finally:
            _STRICT.reset(strict_token)
            _DROPOUT.reset(drop_token)

    return wrapped


def _call_flat(fn, args, kwargs):
    """``quax.quaxify(fn)(*args, **kwargs)``, with the argument and result trees taken apart and
    rebuilt outside quax's machinery: quax sees flat lists of leaves only.

    quax maps over the trees it is given while JAX's current trace is *taken* (``None`` from jax
    0.11), and rebuilding a container there runs its unflatten code outside any trace. Flax NNX
    `Variable`s record the trace they were created in at unflatten (and check it on every update),
    so they must be rebuilt where `fn` runs: inside the quax trace, as here, never in between.
    """
    # `fn` too: it may be a pytree holding LoRA nodes (an Equinox module, say)
    leaves, treedef = jax.tree_util.tree_flatten((fn, args, kwargs), is_leaf=_is_node)
    out_tree = []

    def flat_fn(*leaves):
        fn, args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
        out, tree = jax.tree_util.tree_flatten(fn(*args, **kwargs), is_leaf=_is_node)
        out_tree.append(tree)
        return out

    out = quax.quaxify(flat_fn)(*leaves)
    return jax.tree_util.tree_unflatten(out_tree[-1], out)


def _is_node(x) -> bool:
    return isinstance(x, quax.ArrayValue)


def _default(primitive, values, params, why: str = "which has no factored rule"):
    for v in values:
        if isinstance(v, (LoRA, Quantized)):
            on_materialise(v, str(primitive), why)
    return primitive.bind(*[_materialise(v) for v in values], **params)


LoRA.default = staticmethod(_default)
Quantized.default = staticmethod(_default)


def _dropout(x, node: LoRA):
    state = _DROPOUT.get()
    if state is None or node.dropout == 0.0:
        return x
    key = jax.random.fold_in(state[0], state[1])
    state[1] += 1
    keep = jax.random.bernoulli(key, 1.0 - node.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - node.dropout), 0).astype(x.dtype)


# ----------------------------------------------------------------------------- dot_general


def _letters():
    return iter(string.ascii_letters)


def _factored_dot(x, node: LoRA, x_contract, l_contract, x_batch, l_batch, lora_is_rhs, params):
    """``dot_general(x, w) + scale·(x@a)@b`` (or ``… + scale·(x@bᵀ)@aᵀ``), laid out as
    ``dot_general(x, w)`` would be. Callers have checked `_factored_dot_applies`.

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
        w = _dequantize_at(w, x)
        return lax.dot_general_p.bind(*((x, w) if lora_is_rhs else (w, x)), **params)

    j = "".join
    specs = _Specs(j(x_spec), j(w_spec), j(first_spec), j(t_spec), j(second_spec), j(out_spec))
    xd = _dropout(x, node)
    product = _factored_product(base, specs, node.scale, params.get("precision"))
    out, = product(x, None if xd is x else xd, node.w, first_arr, second_arr)
    return out


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
        # XLA:CPU (jaxlib 0.10.2, its YNNPACK fusion) miscompiles this multiply-reduce when the
        # result has a unit axis, e.g. a batch of 1 (errors of order 1); without them it is exact.
        unit = [d for d, n in enumerate(shape) if n == 1]
        return (jnp.squeeze(u, unit) * jnp.squeeze(v, unit)).sum(-1).reshape(shape), acc

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
            w = _dequantize_at(w, g)
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


def _dequantize_at(w, v):
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

    return Quantized(codes=tie(w.codes), scale=tie(w.scale), offset=tie(w.offset), format=w.format,
                     out_dtype=w.out_dtype, transposed=w.transposed, pad=w.pad).dequantize()


def _primal_value(v):
    """The value of a custom_vjp primal (a pytree of `CustomVJPPrimal`s: `w` may be `Quantized`)."""
    return jax.tree_util.tree_map(lambda p: p.value, v, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))


def _perturbed(v) -> bool:
    leaves = jax.tree_util.tree_leaves(v, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))
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


def _dot(lhs, rhs, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if isinstance(rhs, LoRA):
        return _factored_dot(lhs, rhs, lc, rc, lb, rb, True, params)
    return _factored_dot(rhs, lhs, rc, lc, rb, lb, False, params)


def _dot_or_materialise(lhs, rhs, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    node = rhs if isinstance(rhs, LoRA) else lhs
    contract, batch = (rc, rb) if node is rhs else (lc, lb)
    if not _factored_dot_applies(node, contract, batch):
        why = (f"which contracts its axes {tuple(contract)} (batch axes {tuple(batch)}) while its "
               f"leading {node.num_batch_axes} axes are stacked and the rest have roles "
               f"{node.roles!r}; give `apply` a matching layout={{regex: roles}}")
        return _default(lax.dot_general_p, (lhs, rhs), params, why)
    return _dot(lhs, rhs, params)


def _factored_dot_applies(node: LoRA, l_contract, l_batch) -> bool:
    """The product contracts exactly the node's "i" axes or exactly its "o" axes, and its batch
    axes (stacked layers) are not contracted over."""
    nb = node.num_batch_axes
    contracted = set(l_contract)
    if any(d < nb for d in contracted) or any(d >= nb for d in l_batch):
        return False
    ins = {nb + k for k, role in enumerate(node.roles) if role == "i"}
    outs = {nb + k for k, role in enumerate(node.roles) if role == "o"}
    return contracted in (ins, outs)


@quax.register(lax.dot_general_p)
def _(lhs: ArrayLike, rhs: LoRA, **params):
    return _dot_or_materialise(lhs, rhs, params)


@quax.register(lax.dot_general_p)
def _(lhs: LoRA, rhs: ArrayLike, **params):
    return _dot_or_materialise(lhs, rhs, params)


@quax.register(lax.dot_general_p)
def _(lhs: LoRA, rhs: LoRA, **params):
    on_materialise(lhs, "dot_general (both operands LoRA)")
    return _dot_or_materialise(merge_node(lhs), rhs, params)


# ----------------------------------------------------------------------------- conv


@quax.register(lax.conv_general_dilated_p)
def _(lhs: ArrayLike, rhs: LoRA, **params):
    dn = params["dimension_numbers"]
    out_dim = dn.rhs_spec[0]
    expected = "".join("o" if d == out_dim else "i" for d in range(rhs.w.ndim))
    if (rhs.num_batch_axes or rhs.roles != expected or params["feature_group_count"] != 1
            or params["batch_group_count"] != 1):
        return _default(lax.conv_general_dilated_p, (lhs, rhs), params)
    base = lax.conv_general_dilated_p.bind(lhs, dense(rhs.w), **params)  # (quantized: dequantized)
    dtype = jnp.promote_types(lhs.dtype, rhs.a.dtype)
    a_kernel = jnp.moveaxis(rhs.a, -1, out_dim).astype(dtype)  # a conv to r channels
    t = lax.conv_general_dilated_p.bind(_dropout(lhs, rhs).astype(dtype), a_kernel,
                                        **{**params, "preferred_element_type": None})
    feature = dn.out_spec[1]
    t = jnp.moveaxis(t, feature, -1) * jnp.asarray(rhs.scale, dtype)
    delta = jnp.moveaxis(jnp.tensordot(t, rhs.b.astype(dtype), axes=1,
                                       precision=params.get("precision")), -1, feature)
    return base + delta.astype(base.dtype)


# ----------------------------------------------------------------------------- gather


def _is_row_lookup(shape, params) -> bool:
    """The gather takes whole rows of a 2-D table (``table[ids]``, ``jnp.take(table, ids, 0)``)."""
    dn = params["dimension_numbers"]
    return (len(shape) == 2 and tuple(dn.collapsed_slice_dims) == (0,)
            and tuple(dn.start_index_map) == (0,) and not dn.operand_batching_dims
            and tuple(params["slice_sizes"]) == (1, shape[1]) and len(dn.offset_dims) == 1)


def _gather_rows(w, indices, params):
    """A row lookup (`_is_row_lookup`) from a plain or a quantized table; a quantized one (blocked
    along its rows) dequantizes the gathered rows only."""
    if not isinstance(w, Quantized):
        return lax.gather_p.bind(w, indices, **params)
    if w.transposed:  # blocks run along the table's columns: dequantize it (a temporary)
        return lax.gather_p.bind(w.dequantize(), indices, **params)
    mode = {lax.GatherScatterMode.CLIP: "clip", lax.GatherScatterMode.FILL_OR_DROP: "fill"}.get(
        lax.GatherScatterMode.from_any(params["mode"]), "clip")  # in bounds: any
    take = lambda v: None if v is None else jnp.take(v, indices[..., 0], axis=0, mode=mode)
    rows = Quantized(codes=take(w.codes), scale=take(w.scale), offset=take(w.offset), format=w.format,
                     out_dtype=w.out_dtype, pad=w.pad).dequantize()
    return jnp.moveaxis(rows, -1, params["dimension_numbers"].offset_dims[0])


@quax.register(lax.gather_p)
def _(operand: LoRA, indices: ArrayLike, **params):
    """Embedding lookup ``table[ids]`` with table roles "io": ``w[ids] + scale·a[ids]@b``."""
    dn = params["dimension_numbers"]
    w = operand.w
    if not (operand.num_batch_axes == 0 and operand.roles == "io" and _is_row_lookup(w.shape, params)):
        return _default(lax.gather_p, (operand, indices), params)
    base = _gather_rows(w, indices, params)
    t = lax.gather_p.bind(operand.a, indices, **{**params, "slice_sizes": (1, operand.rank)})
    axis = dn.offset_dims[0]
    t = jnp.moveaxis(t, axis, -1) * jnp.asarray(operand.scale, t.dtype)
    delta = jnp.moveaxis(t @ operand.b, -1, axis)
    return base + delta.astype(base.dtype)


# ----------------------------------------------------------------------------- layout-only ops


@quax.register(lax.convert_element_type_p)
def _(x: LoRA, **params):
    """A dtype cast of the weight (Flax's `promote_dtype`) keeps the node factored."""
    w = (x.w.astype(params["new_dtype"]) if isinstance(x.w, Quantized)
         else lax.convert_element_type_p.bind(x.w, **params))
    return LoRA(w=w, a=x.a, b=x.b, scale=x.scale, roles=x.roles, dropout=x.dropout)


@quax.register(lax.transpose_p)
def _(x: LoRA, *, permutation):
    nb = x.num_batch_axes
    perm = tuple(permutation)
    if perm[:nb] != tuple(range(nb)):
        return _default(lax.transpose_p, (x,), {"permutation": permutation})
    tail = [p - nb for p in perm[nb:]]
    roles = "".join(x.roles[p] for p in tail)
    old_ins = [k for k, role in enumerate(x.roles) if role == "i"]
    old_outs = [k for k, role in enumerate(x.roles) if role == "o"]
    new_ins = [p for p in tail if x.roles[p] == "i"]
    new_outs = [p for p in tail if x.roles[p] == "o"]
    a_perm = list(range(nb)) + [nb + old_ins.index(p) for p in new_ins] + [x.a.ndim - 1]
    b_perm = list(range(nb + 1)) + [nb + 1 + old_outs.index(p) for p in new_outs]
    return LoRA(w=_transpose_w(x.w, perm), a=jnp.transpose(x.a, a_perm),
                b=jnp.transpose(x.b, b_perm), scale=x.scale, roles=roles, dropout=x.dropout)


# ----------------------------------------------------------------------------- remat


@quax.register(remat_p)
def _(*args: ArrayLike | quax.ArrayValue, jaxpr, prevent_cse, differentiated, policy):
    """Re-trace the checkpointed body with LoRA-aware rules, then checkpoint that."""
    del differentiated
    closed = jaxpr if isinstance(jaxpr, jex.ClosedJaxpr) else jex.ClosedJaxpr(jaxpr, ())
    body = jex.jaxpr_as_fun(closed)
    leaves, treedef = jax.tree_util.tree_flatten(args)

    def flat_body(*flat):
        return quax.quaxify(body)(*jax.tree_util.tree_unflatten(treedef, flat))

    return jax.checkpoint(flat_body, prevent_cse=prevent_cse, policy=policy)(*leaves)


def _transpose_w(w, perm):
    """`jnp.transpose` of a LoRA's `w`; a quantized one flips its layout flag when `perm` swaps the
    last two axes, and is dequantized (with a warning) for any other permutation."""
    if not isinstance(w, Quantized):
        return jnp.transpose(w, perm)
    n = len(perm)
    if tuple(perm) == tuple(range(n)):
        return w
    if n >= 2 and tuple(perm) == (*range(n - 2), n - 1, n - 2):
        return w.swap_last_axes()
    on_materialise(w, "transpose", f"which permutes its axes {tuple(perm)} (only a swap of the last "
                   "two is a layout flag)")
    return jnp.transpose(w.dequantize(), perm)


# ----------------------------------------------------------------------------- quantized weights
# A `Quantized` outside any LoRA node (a frozen embedding, say): products dequantize where they run
# and again in the backward pass; row lookups dequantize the rows; `.T` and dtype casts are flags.


def _quantized_dot(lhs, rhs, params):
    q_is_rhs = isinstance(rhs, Quantized)
    x, q = (lhs, rhs) if q_is_rhs else (rhs, lhs)
    x_aval = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    def run(x, w):
        return lax.dot_general_p.bind(*((x, w) if q_is_rhs else (w, x)), **params)

    @jax.custom_vjp
    def product(x, q):
        return run(x, q.dequantize())

    def fwd(x, q):
        return run(x, _dequantize_at(q, x)), q  # residual: the blocks, not a float weight

    def bwd(q, g):
        w = _dequantize_at(q, g)  # recomputed once g exists (not merged with the forward's)
        dx, = jax.linear_transpose(lambda x_: run(x_, w), x_aval)(g)
        return dx, None

    product.defvjp(fwd, bwd)
    return product(x, q)


@quax.register(lax.dot_general_p)
def _(lhs: ArrayLike, rhs: Quantized, **params):
    return _quantized_dot(lhs, rhs, params)


@quax.register(lax.dot_general_p)
def _(lhs: Quantized, rhs: ArrayLike, **params):
    return _quantized_dot(lhs, rhs, params)


@quax.register(lax.gather_p)
def _(operand: Quantized, indices: ArrayLike, **params):
    if not _is_row_lookup(operand.shape, params):
        return _default(lax.gather_p, (operand, indices), params)
    return _gather_rows(operand, indices, params)


@quax.register(lax.convert_element_type_p)
def _(x: Quantized, **params):
    if not jnp.issubdtype(params["new_dtype"], jnp.floating):
        return _default(lax.convert_element_type_p, (x,), params)
    return x.astype(params["new_dtype"])


@quax.register(lax.transpose_p)
def _(x: Quantized, *, permutation):
    n, perm = x.ndim, tuple(permutation)
    if perm == tuple(range(n)):
        return x
    if n >= 2 and perm == (*range(n - 2), n - 1, n - 2):
        return x.swap_last_axes()
    return _default(lax.transpose_p, (x,), {"permutation": permutation})
