"""`layout_of`: each weight's axis roles, read from how a function uses it.

A kernel's shape does not say which axes a product contracts: a scan-stacked Dense kernel
(L, d, d), a DenseGeneral kernel (d_model, heads, head_dim) and an einsum weight
(heads, d_model, head_dim) all look alike. The function that uses them does say: `layout_of` traces
it once, abstractly (`jax.make_jaxpr`, no FLOPs), follows every weight through the jaxpr and reads
the roles off the products it meets (see `lora_jax.node` for what roles mean):

* ``dot_general``: contracted axes are "i", free axes "o", dot batch axes are leading batch axes;
* ``conv_general_dilated`` (the weight as kernel): the output-feature axis is "o", the rest "i";
* ``gather`` of whole rows (an embedding lookup): the indexed axis is "i", the rest "o".

On the way, dtype casts, copies, transposes, reshapes that only add or drop unit axes, and
jit/call/custom_jvp/custom_vjp/remat/cond/while/scan bodies are followed. An axis that is sliced
off (a scan over a stacked weight, ``w[i]``) is a batch axis.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from lora_jax.paths import flatten_with_paths


class _Cut(NamedTuple):
    """A size-1 slice of the weight's axis `axis`, not yet squeezed away."""
    axis: int


class _Track(NamedTuple):
    """A value derived from weight `leaf` without mixing its axes.

    `axes[d]` names where axis d of the value comes from: an axis of the weight (int), a slice of
    one (`_Cut`), or nothing (None: an inserted unit axis). `cut` holds the weight's axes sliced off
    on the way (batch axes). `lost` says why the axes could no longer be followed.
    """
    leaf: int
    axes: tuple
    cut: frozenset = frozenset()
    lost: str | None = None


class _Use(NamedTuple):
    """One product that reads a weight: which of its axes are batch, input and output."""
    what: str
    batch: frozenset = frozenset()
    ins: frozenset = frozenset()
    outs: frozenset = frozenset()
    gather: bool = False
    bad: str | None = None


def layout_of(fn: Callable, params, *args, **kwargs) -> dict[str, str]:
    """``{path: roles}`` for the weights of `params`, from how ``fn(params, *args, **kwargs)`` uses them.

    Traces `fn` once with `jax.make_jaxpr` (shapes only: nothing is computed) and follows every
    float leaf of `params` with ndim ≥ 2 to the products that read it. Paths are those `apply`
    uses; roles describe the trailing axes as in `lora_jax.node` (leading batch axes, e.g. the
    layer axis of a scan-stacked kernel, are left out of the string). Pass the result to
    ``lora_jax.apply(params, layout=...)``.

    Leaves read by no product (norm scales, position tables added to activations) are left out.
    So are leaves whose uses disagree (one product contracts an axis another keeps), whose batch
    axes are not leading, or that reach a product through an operation whose axes cannot be
    followed (e.g. a reshape merging axes): one `UserWarning` lists those with the uses involved,
    and `apply` then needs an explicit ``layout`` entry for them (or `exclude`).

    A weight read by several products needs one split of its axes into batch, input and output
    axes, in either orientation: a tied embedding is gathered by rows ("io") and contracted over
    its features by ``attend`` (the same split, reversed), which `wrap` runs factored. A gather
    decides the orientation; otherwise the first product does.
    """
    leaves, treedef = jax.tree.flatten(params)
    traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def call(*arrays):
        full = list(leaves)
        for i, x in zip(traced, arrays):
            full[i] = x
        return fn(jax.tree.unflatten(treedef, full), *args, **kwargs)

    closed = jax.make_jaxpr(call)(*[leaves[i] for i in traced])
    paths = [p for p, _ in flatten_with_paths(params)[0]]
    env = {}
    for k, (var, i) in enumerate(zip(closed.jaxpr.invars, traced)):
        leaf = leaves[i]
        if np.ndim(leaf) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating):
            env[var] = _Track(k, tuple(range(np.ndim(leaf))))
    uses: dict[int, list[_Use]] = {}
    _walk(closed.jaxpr, env, uses)

    layout, problems = {}, []
    for k, found in sorted(uses.items()):
        i = traced[k]
        roles, problem = _roles(found, np.ndim(leaves[i]))
        if problem:
            problems.append(f"{paths[i]!r} {tuple(np.shape(leaves[i]))}: {problem}")
        else:
            layout[paths[i]] = roles
    if problems:
        warnings.warn("layout_of left out weights whose roles it cannot read from their uses "
                      "(give them layout={regex: roles} in `apply`, or exclude them):\n  "
                      + "\n  ".join(problems), UserWarning, stacklevel=2)
    return layout


def _is_array(x) -> bool:
    """Arrays and `jax.ShapeDtypeStruct`s (so `params` may be abstract, e.g. from `jax.eval_shape`)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


# ----------------------------------------------------------------------------- combining uses


def _pattern(use: _Use, ndim: int) -> str:
    """The use's reading of the weight's axes, e.g. 'bio' (batch, input, output)."""
    return "".join("b" if d in use.batch else "i" if d in use.ins else "o" if d in use.outs else "?"
                   for d in range(ndim))


def _roles(uses: list[_Use], ndim: int) -> tuple[str | None, str | None]:
    """(roles, None) from a weight's uses, or (None, why not)."""
    bad = [u for u in uses if u.bad]
    if bad:
        return None, f"{bad[0].what}: {bad[0].bad}"
    ref = next((u for u in uses if u.gather), uses[0])
    for u in uses:
        if u.batch != ref.batch or {u.ins, u.outs} != {ref.ins, ref.outs}:
            return None, (f"its uses disagree: {ref.what} reads its axes as "
                          f"{_pattern(ref, ndim)!r}, {u.what} as {_pattern(u, ndim)!r} "
                          "(b: batch, i: input, o: output)")
    nb = len(ref.batch)
    if ref.batch != frozenset(range(nb)):
        return None, (f"{ref.what} reads its axes as {_pattern(ref, ndim)!r}: batch axes "
                      f"{sorted(ref.batch)} are not leading, which a LoRA node cannot express")
    return "".join("i" if d in ref.ins else "o" for d in range(nb, ndim)), None


def _use(t: _Track, what: str, role_of: Callable[[int], str], gather=False) -> _Use:
    """A use of tracked value `t` whose axis d has role ``role_of(d)`` in "b"/"i"/"o"."""
    if t.lost:
        return _Use(what, bad=t.lost)
    sets = {"b": set(t.cut), "i": set(), "o": set()}
    for d, ax in enumerate(t.axes):
        if isinstance(ax, _Cut):
            sets["b"].add(ax.axis)
        elif ax is not None:
            sets[role_of(d)].add(ax)
    batch, ins, outs = (frozenset(sets[k]) for k in "bio")
    bad = None
    if not ins or not outs:
        bad = f"it has no {'input' if not ins else 'output'} axis, so no low-rank factors fit this use"
    return _Use(what, batch, ins, outs, gather, bad)


# ----------------------------------------------------------------------------- the walk


def _walk(jaxpr, env: dict, uses: dict) -> list:
    """Follow tracked values through `jaxpr` (an open `Jaxpr`), recording product uses.

    `env` maps the tracked invars to their `_Track`; returns the outvars' tracks (or None)."""
    env = dict(env)

    def read(v):
        return env.get(v) if isinstance(v, jex.Var) else None

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if not any(ins):
            continue
        outs = _rule(eqn, ins, uses)
        for v, t in zip(eqn.outvars, outs):
            if t is not None:
                env[v] = t
    return [read(v) for v in jaxpr.outvars]


_SAME = {"convert_element_type", "copy", "copy_p", "device_put", "optimization_barrier",
         "sharding_constraint", "reduce_precision", "pvary"}


def _rule(eqn, ins: list, uses: dict) -> list:
    name = eqn.primitive.name
    p = eqn.params
    none = [None] * len(eqn.outvars)
    if name in _SAME:
        return ins[: len(eqn.outvars)] if len(ins) >= len(eqn.outvars) else none
    t = ins[0]
    if name == "transpose" and t:
        return [t._replace(axes=tuple(t.axes[k] for k in p["permutation"])) if not t.lost else t]
    if name in ("reshape", "squeeze", "broadcast_in_dim") and t:
        return [_reshape(t, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape, name)]
    if name in ("slice", "dynamic_slice") and t:
        return [_slice(t, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)] + none[1:]
    if name == "gather" and t:
        return [_gather(eqn, t, uses)]
    if name == "dot_general":
        _dot(eqn, ins, uses)
        return none
    if name == "conv_general_dilated":
        _conv(eqn, ins, uses)
        return none
    if name == "scan":
        return _scan(eqn, ins, uses)
    if name == "while":
        return _while(eqn, ins, uses)
    if name == "cond":
        return _cond(eqn, ins, uses)
    return _call(eqn, ins, uses)


def _record(uses, t: _Track, use: _Use):
    uses.setdefault(t.leaf, []).append(use)


def _dot(eqn, ins, uses):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for t, contract, batch in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if t:
            role = lambda d, c=set(contract), b=set(batch): "i" if d in c else "b" if d in b else "o"
            _record(uses, t, _use(t, f"dot_general contracting {tuple(contract)}", role))


def _conv(eqn, ins, uses):
    if ins[0]:
        _record(uses, ins[0], _Use("conv_general_dilated", bad="it is the conv's input, not its kernel"))
    if ins[1]:
        out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        _record(uses, ins[1], _use(ins[1], "conv_general_dilated",
                                   lambda d: "o" if d == out_dim else "i"))


def _gather(eqn, t: _Track, uses):
    """Whole-row lookups: one index is a slice (the axis becomes batch), many an embedding lookup."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    collapsed = set(dn.collapsed_slice_dims)
    whole = (not dn.operand_batching_dims and set(dn.start_index_map) == collapsed
             and all(sizes[d] == (1 if d in collapsed else shape[d]) for d in range(len(shape))))
    if not whole:
        return t._replace(lost="it is gathered in partial slices")
    idx_shape = eqn.invars[1].aval.shape
    if math.prod(idx_shape) // max(len(collapsed), 1) == 1:  # one index: w[i]
        kept = iter([ax for d, ax in enumerate(t.axes) if d not in collapsed])
        cut = t.cut | {t.axes[d].axis if isinstance(t.axes[d], _Cut) else t.axes[d]
                       for d in collapsed if t.axes[d] is not None}
        offset = set(dn.offset_dims)
        out_ndim = len(eqn.outvars[0].aval.shape)
        return t._replace(axes=tuple(next(kept) if d in offset else None for d in range(out_ndim)),
                          cut=frozenset(cut))
    _record(uses, t, _use(t, "gather (embedding lookup)", lambda d: "i" if d in collapsed else "o",
                          gather=True))
    return None


def _reshape(t: _Track, old, new, name) -> _Track:
    """One-to-one reshapes only: unit axes come and go, every other axis keeps its size and order."""
    if t.lost:
        return t
    real_old = [(s, ax) for s, ax in zip(old, t.axes) if s != 1]
    real_new = [s for s in new if s != 1]
    if [s for s, _ in real_old] != real_new:
        return t._replace(lost=f"a {name} from {tuple(old)} to {tuple(new)} mixes its axes")
    dropped = [ax for s, ax in zip(old, t.axes) if s == 1 and ax is not None]
    if any(isinstance(ax, int) for ax in dropped):  # a genuine unit axis of the weight
        return t._replace(lost=f"a {name} from {tuple(old)} to {tuple(new)} drops one of its axes")
    src = iter(ax for _, ax in real_old)
    axes = tuple(next(src) if s != 1 else None for s in new)
    return t._replace(axes=axes, cut=t.cut | {ax.axis for ax in dropped})


def _slice(t: _Track, old, new) -> _Track:
    if t.lost:
        return t
    axes = []
    for ax, a, b in zip(t.axes, old, new):
        if a == b:
            axes.append(ax)
        elif b == 1 and ax is not None:
            axes.append(ax if isinstance(ax, _Cut) else _Cut(ax))
        else:
            return t._replace(lost=f"it is sliced from {tuple(old)} to {tuple(new)}")
    return t._replace(axes=tuple(axes))


def _drop_leading(t: _Track) -> _Track:
    """`t` with its leading axis sliced off (a scan over it): that axis becomes a batch axis."""
    if t.lost:
        return t
    ax = t.axes[0]
    cut = t.cut | ({ax.axis} if isinstance(ax, _Cut) else {ax} if ax is not None else set())
    return t._replace(axes=t.axes[1:], cut=frozenset(cut))


def _open(j):
    return j.jaxpr if isinstance(j, jex.ClosedJaxpr) else j


def _scan(eqn, ins, uses):
    n = eqn.params["num_consts"] + eqn.params["num_carry"]
    body = _open(eqn.params["jaxpr"])
    inner = [t if (t is None or k < n) else _drop_leading(t) for k, t in enumerate(ins)]
    _walk(body, {v: t for v, t in zip(body.invars, inner) if t}, uses)
    return [None] * len(eqn.outvars)


def _while(eqn, ins, uses):
    nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    carry = ins[nc + nb:]
    for jaxpr, tracks in ((eqn.params["cond_jaxpr"], ins[:nc] + carry),
                          (eqn.params["body_jaxpr"], ins[nc:nc + nb] + carry)):
        j = _open(jaxpr)
        _walk(j, {v: t for v, t in zip(j.invars, tracks) if t}, uses)
    return [None] * len(eqn.outvars)


def _cond(eqn, ins, uses):
    results = []
    for branch in eqn.params["branches"]:
        j = _open(branch)
        results.append(_walk(j, {v: t for v, t in zip(j.invars, ins[1:]) if t}, uses))
    return [outs[0] if all(o == outs[0] for o in outs) else None for outs in zip(*results)]


def _call(eqn, ins, uses):
    """jit, closed/core calls, custom_jvp/custom_vjp, remat, …: one body taking the same operands."""
    bodies = [_open(v) for v in eqn.params.values() if isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr))]
    if len(bodies) != 1 or len(bodies[0].invars) != len(ins):
        return [None] * len(eqn.outvars)
    body = bodies[0]
    outs = _walk(body, {v: t for v, t in zip(body.invars, ins) if t}, uses)
    return outs if len(outs) == len(eqn.outvars) else [None] * len(eqn.outvars)

