"""The quax rules: how each primitive acts on a `LoRA` or a `Quantized` operand.

Products (`dot_general`, `conv_general_dilated`, row `gather`s) run factored (`lora_jax.product`);
layout-only operations (dtype casts, transposes) return a node again; `remat` re-traces its body
with these rules. A primitive without a rule, or a product whose axes do not match the node's
roles, goes to `lora_jax.policy.fallback` (materialise, with a warning or, strict, an error).
Importing this module registers the rules; `lora_jax.wrapping` does so.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import quax
from jax import lax
from jax.extend.core.primitives import remat_p
from jaxtyping import ArrayLike

from lora_jax.node import LoRA, merge_node
from lora_jax.policy import fallback, on_materialise
from lora_jax.product import adapter_input, factored_dot, quantized_dot
from lora_jax.quant import Quantized, dense


def _dot(lhs, rhs, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if isinstance(rhs, LoRA):
        return factored_dot(lhs, rhs, lc, rc, lb, rb, True, params)
    return factored_dot(rhs, lhs, rc, lc, rb, lb, False, params)


def _dot_or_materialise(lhs, rhs, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    node = rhs if isinstance(rhs, LoRA) else lhs
    contract, batch = (rc, rb) if node is rhs else (lc, lb)
    if not _factored_dot_applies(node, contract, batch):
        why = (f"which contracts its axes {tuple(contract)} (batch axes {tuple(batch)}) while its "
               f"leading {node.num_batch_axes} axes are stacked and the rest have roles "
               f"{node.roles!r}; give `apply` a matching layout={{regex: roles}}")
        return fallback(lax.dot_general_p, (lhs, rhs), params, why)
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
    if node.is_dora and contracted == outs and set(l_batch) != set(range(nb)):
        return False  # DoRA's scale would fall on x's columns, which lack w's free batch axes
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
        return fallback(lax.conv_general_dilated_p, (lhs, rhs), params)
    base = lax.conv_general_dilated_p.bind(lhs, dense(rhs.w), **params)  # (quantized: dequantized)
    dtype = jnp.promote_types(lhs.dtype, rhs.a.dtype)
    a_kernel = jnp.moveaxis(rhs.a, -1, out_dim).astype(dtype)  # a conv to r channels
    t = lax.conv_general_dilated_p.bind(adapter_input(lhs, rhs).astype(dtype), a_kernel,
                                        **{**params, "preferred_element_type": None})
    feature = dn.out_spec[1]
    t = jnp.moveaxis(t, feature, -1) * jnp.asarray(rhs.scale, dtype)
    delta = jnp.moveaxis(jnp.tensordot(t, rhs.b.astype(dtype), axes=1,
                                       precision=params.get("precision")), -1, feature)
    out = base + delta.astype(base.dtype)
    return _dora_features(out, rhs, feature)


def _dora_features(out, node: LoRA, feature: int):
    """A DoRA node's conv or lookup output (one axis `feature` of output units) times
    ``m / ‖w_eff‖``; a plain node's as it is."""
    if not node.is_dora:
        return out
    acc = jnp.promote_types(out.dtype, jnp.float32)
    k = jnp.expand_dims(node.column_scale(acc), [d for d in range(out.ndim) if d != feature])
    return (out.astype(acc) * k).astype(out.dtype)


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
    rows = dataclasses.replace(w, codes=take(w.codes), scale=take(w.scale),
                               offset=take(w.offset)).dequantize()
    return jnp.moveaxis(rows, -1, params["dimension_numbers"].offset_dims[0])


@quax.register(lax.gather_p)
def _(operand: LoRA, indices: ArrayLike, **params):
    """Embedding lookup ``table[ids]`` with table roles "io": ``w[ids] + scale·a[ids]@b`` (DoRA:
    times ``m / ‖w_eff‖``, the norm per column over the table's rows, as PEFT's DoRA embedding)."""
    dn = params["dimension_numbers"]
    w = operand.w
    if not (operand.num_batch_axes == 0 and operand.roles == "io" and operand.num_adapters is None
            and _is_row_lookup(w.shape, params)):  # (stacked adapters: merge_node says why not)
        return fallback(lax.gather_p, (operand, indices), params)
    base = _gather_rows(w, indices, params)
    t = lax.gather_p.bind(operand.a, indices, **{**params, "slice_sizes": (1, operand.rank)})
    axis = dn.offset_dims[0]
    t = jnp.moveaxis(t, axis, -1) * jnp.asarray(operand.scale, t.dtype)
    delta = jnp.moveaxis(t @ operand.b, -1, axis)
    return _dora_features(base + delta.astype(base.dtype), operand, axis)


# ----------------------------------------------------------------------------- layout-only ops


@quax.register(lax.convert_element_type_p)
def _(x: LoRA, **params):
    """A dtype cast of the weight (Flax's `promote_dtype`) keeps the node factored."""
    w = (x.w.astype(params["new_dtype"]) if isinstance(x.w, Quantized)
         else lax.convert_element_type_p.bind(x.w, **params))
    return dataclasses.replace(x, w=w)


@quax.register(lax.transpose_p)
def _(x: LoRA, *, permutation):
    nb = x.num_batch_axes
    perm = tuple(permutation)
    if perm[:nb] != tuple(range(nb)):
        return fallback(lax.transpose_p, (x,), {"permutation": permutation})
    tail = [p - nb for p in perm[nb:]]
    roles = "".join(x.roles[p] for p in tail)
    old_ins = [k for k, role in enumerate(x.roles) if role == "i"]
    old_outs = [k for k, role in enumerate(x.roles) if role == "o"]
    new_ins = [p for p in tail if x.roles[p] == "i"]
    new_outs = [p for p in tail if x.roles[p] == "o"]
    lead = nb + (x.num_adapters is not None)  # batch axes, then the adapter axis if stacked
    a_perm = list(range(lead)) + [lead + old_ins.index(p) for p in new_ins] + [x.a.ndim - 1]
    b_perm = list(range(lead + 1)) + [lead + 1 + old_outs.index(p) for p in new_outs]
    m_perm = list(range(lead)) + [lead + old_outs.index(p) for p in new_outs]  # (*batch, *outs)
    m = None if x.m is None else jnp.transpose(x.m, m_perm)
    return dataclasses.replace(x, w=_transpose_w(x.w, perm), a=jnp.transpose(x.a, a_perm),
                               b=jnp.transpose(x.b, b_perm), roles=roles, m=m)


# ----------------------------------------------------------------------------- remat


@quax.register(remat_p)
def _(*args: ArrayLike | quax.ArrayValue, jaxpr, prevent_cse, differentiated, policy):
    """Re-trace the checkpointed body with LoRA-aware rules, then checkpoint that."""
    del differentiated
    closed = jaxpr if isinstance(jaxpr, jex.ClosedJaxpr) else jex.ClosedJaxpr(jaxpr, ())
    body = jex.jaxpr_as_fun(closed)
    leaves, treedef = jax.tree.flatten(args)

    def flat_body(*flat):
        return quax.quaxify(body)(*jax.tree.unflatten(treedef, flat))

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


@quax.register(lax.dot_general_p)
def _(lhs: ArrayLike, rhs: Quantized, **params):
    return quantized_dot(lhs, rhs, params)


@quax.register(lax.dot_general_p)
def _(lhs: Quantized, rhs: ArrayLike, **params):
    return quantized_dot(lhs, rhs, params)


@quax.register(lax.gather_p)
def _(operand: Quantized, indices: ArrayLike, **params):
    if not _is_row_lookup(operand.shape, params):
        return fallback(lax.gather_p, (operand, indices), params)
    return _gather_rows(operand, indices, params)


@quax.register(lax.convert_element_type_p)
def _(x: Quantized, **params):
    if not jnp.issubdtype(params["new_dtype"], jnp.floating):
        return fallback(lax.convert_element_type_p, (x,), params)
    return x.astype(params["new_dtype"])


@quax.register(lax.transpose_p)
def _(x: Quantized, *, permutation):
    n, perm = x.ndim, tuple(permutation)
    if perm == tuple(range(n)):
        return x
    if n >= 2 and perm == (*range(n - 2), n - 1, n - 2):
        return x.swap_last_axes()
    return fallback(lax.transpose_p, (x,), {"permutation": permutation})
