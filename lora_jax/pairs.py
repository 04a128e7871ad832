"""LoRA factors stored as sibling leaves (Qwix / Tunix, Flax NNX, Keras): `paired` and `merge_pairs`.

Other JAX libraries keep a LoRA adapter as two ordinary leaves next to the weight they adapt:

=============================  ===================================  ==========================
library                        factor leaves                        scale
=============================  ===================================  ==========================
Qwix (Tunix, MaxText)          ``<weight>_lora_a``, ``<weight>_lora_b``  ``alpha / rank``
Flax NNX ``nnx.LoRA[Linear]``  ``lora_a``, ``lora_b``                1
Keras 3 ``enable_lora``        ``lora_kernel_a``, ``lora_kernel_b``  ``lora_alpha / rank``
=============================  ===================================  ==========================

all with the forward ``x @ a @ b``: in this library's kernel orientation, ``a`` is
``(*batch, *in, r)`` and ``b`` is ``(*batch, r, *out)`` (Qwix flattens a dot_general's contracting
axes into one; its einsum factors keep them). `paired(tx)` finds the pairs, presents each as a
`lora_jax.LoRA` node (``w=None``, as in the trainable half of `lora_jax.split`) to `tx`, and puts
`tx`'s results back into the two leaves, so every optimizer of this library (`lora_pro`,
`lora_pro_adamw`, `riemannian`, `loraplus`) and any optax chain around them runs unchanged on such
trees, with the same grouped eigendecompositions. `merge_pairs` folds the pairs into their weights.

Paths are the '/'-joined key names of a leaf (`lora_jax.paths.path_str`: an NNX Variable's
``.value`` hop dropped); a flat dict key holding '/' (Keras variable paths) splits into segments too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Callable, Union

import jax
import jax.numpy as jnp
import optax

from lora_jax import gram
from lora_jax.factor_pairs import require_params
from lora_jax.node import LoRA
from lora_jax.paths import flatten_with_paths

Scale = Union[float, Callable[[str], float]]


@dataclasses.dataclass(frozen=True)
class Pair:
    """One adapter found in a flattened tree: leaf indices of its factors, its scale and roles."""

    path: str        # the `a` leaf's path (the pair's key in the tree `tx` sees)
    ia: int
    ib: int
    scale: float
    roles: str       # "i" per input axis of `a`, "o" per output axis of `b` (batch axes excluded)


def find_pairs(paths: list[str], leaves: list, *, a: str, b: str, scale: Scale, batch_axes: int,
               name: str) -> tuple[list[Pair], list[int]]:
    """``(pairs, indices of the other leaves)`` of a flattened tree (module docstring)."""
    _check_names(a, b, batch_axes, name)
    index = {}
    for i, p in enumerate(paths):
        if p in index:
            raise ValueError(f"{name}: two leaves have the path {p!r}; rename one (pairs are found "
                             "by '/'-joined paths)")
        index[p] = i
    pairs, taken = [], set()
    for i, p in enumerate(paths):
        head, _, last = p.rpartition("/")
        if a not in last:
            continue
        partner = (head + "/" if head else "") + last.replace(a, b, 1)
        if partner not in index:
            raise ValueError(f"{name}: {p!r} looks like a LoRA factor `a` (its name contains {a!r}) "
                             f"but there is no {partner!r} beside it; set a=/b= to the factor names "
                             "of your library (Qwix, NNX: 'lora_a'/'lora_b'; Keras: "
                             "'lora_kernel_a'/'lora_kernel_b')")
        j = index[partner]
        roles = _pair_roles(name, p, leaves[i], leaves[j], batch_axes)
        pairs.append(Pair(p, i, j, _scale_of(scale, p, name), roles))
        taken.update((i, j))
    for i, p in enumerate(paths):
        if i not in taken and b in p.rpartition("/")[2]:
            raise ValueError(f"{name}: {p!r} looks like a LoRA factor `b` (its name contains {b!r}) "
                             "but no factor `a` names it as its partner")
    if not pairs:
        raise ValueError(f"{name}: no LoRA factor pair in the tree: no leaf name contains {a!r} "
                         f"(with a {b!r} sibling). Leaves seen: {paths[:6]}{' …' if len(paths) > 6 else ''}")
    return pairs, [i for i in range(len(paths)) if i not in taken]


def _check_names(a, b, batch_axes, name):
    if not (isinstance(a, str) and isinstance(b, str) and a and b and a != b):
        raise ValueError(f"{name}: a and b must be two different non-empty names, got {a!r}, {b!r}")
    if not (isinstance(batch_axes, int) and batch_axes >= 0):
        raise ValueError(f"{name}: batch_axes must be an int >= 0, got {batch_axes!r}")


def _pair_roles(name: str, path: str, a, b, nb: int) -> str:
    a_shape, b_shape = tuple(jnp.shape(a)), tuple(jnp.shape(b))
    if len(a_shape) < nb + 2 or len(b_shape) < nb + 2:
        raise ValueError(f"{name}: factors at {path!r} have shapes a {a_shape}, b {b_shape}: with "
                         f"batch_axes={nb} each needs at least {nb + 2} axes (batch, in or out, rank)")
    if a_shape[:nb] != b_shape[:nb]:
        raise ValueError(f"{name}: factors at {path!r} disagree on their {nb} batch axes: a "
                         f"{a_shape}, b {b_shape}")
    if a_shape[-1] != b_shape[nb]:
        raise ValueError(f"{name}: factors at {path!r} disagree on the rank: a {a_shape} has rank "
                         f"axis (last) {a_shape[-1]}, b {b_shape} has (axis {nb}) {b_shape[nb]}; "
                         "is the pair transposed (a is x @ a, b is (r, out)) or batch_axes wrong?")
    return "i" * (len(a_shape) - nb - 1) + "o" * (len(b_shape) - nb - 1)


def _scale_of(scale: Scale, path: str, name: str) -> float:
    s = scale(path) if callable(scale) else scale
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: the scale of {path!r} must be a number (it is static), got {s!r}")
    if not math.isfinite(s):
        raise ValueError(f"{name}: the scale of {path!r} is {s}")
    return s


def _flatten(tree):
    with_paths, treedef = flatten_with_paths(tree)
    return [p for p, _ in with_paths], [x for _, x in with_paths], treedef


def _as_nodes(pairs: list[Pair], others: list[int], paths, leaves) -> dict:
    """The tree `tx` sees: {a path: LoRA node} for each pair, {path: leaf} for the rest."""
    inner = {pr.path: LoRA(w=None, a=leaves[pr.ia], b=leaves[pr.ib], scale=pr.scale, roles=pr.roles)
             for pr in pairs}
    inner.update({paths[i]: leaves[i] for i in others})
    return inner


def paired(tx: optax.GradientTransformation, *, a: str = "lora_a", b: str = "lora_b",
           scale: Scale = 1.0, batch_axes: int = 0) -> optax.GradientTransformation:
    """`tx` (any transformation of this library, alone or in an optax chain) on a tree whose LoRA
    factors are sibling leaves, as Qwix, Flax NNX and Keras store them (module docstring).

    A leaf whose last path segment contains `a` is a factor ``a`` of shape ``(*batch, *in, r)``;
    its partner is the leaf at the same path with that segment's `a` replaced by `b`, of shape
    ``(*batch, r, *out)``, where ``*batch`` are the first `batch_axes` axes (scan-stacked layers)
    and the forward is ``x @ a @ b`` scaled by `scale` (a number, or a function of the ``a`` leaf's
    path, e.g. Qwix's ``alpha / rank``). `tx` sees a dict with, for each pair, a `lora_jax.LoRA`
    node ``(w=None, a, b, scale, roles)`` under the ``a`` path, and every other leaf (a trainable
    head, a norm) under its own path; its results go back to the original leaves, so updates have
    the structure of the gradients. State is `tx`'s own, for that dict.

    Tunix (``PeftTrainer``) and ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` pass exactly such
    trees::

        tx = lora_jax.paired(optax.chain(lora_jax.lora_pro(), optax.adamw(lr)), scale=alpha / rank)

    Errors (never a silent no-op): a name with `a` but no partner, a `b` without its `a`, factors
    whose batch or rank axes disagree, a tree without any pair, params missing in ``update``.
    """
    tx = optax.with_extra_args_support(tx)

    def plan(params, stage):
        paths, leaves, treedef = _flatten(params)
        pairs, others = find_pairs(paths, leaves, a=a, b=b, scale=scale, batch_axes=batch_axes,
                                   name=f"lora_jax.paired ({stage})")
        return paths, leaves, treedef, pairs, others

    def init_fn(params):
        paths, leaves, _, pairs, others = plan(params, "init")
        return tx.init(_as_nodes(pairs, others, paths, leaves))

    def update_fn(updates, state, params=None, **extra):
        require_params(params, "lora_jax.paired")
        paths, p_leaves, p_def, pairs, others = plan(params, "update")
        u_leaves, u_def = jax.tree.flatten(updates)
        if u_def != p_def:
            raise ValueError("lora_jax.paired: `updates` and `params` have different tree structures; "
                             "pass as params the tree the gradients were taken with respect to.\n"
                             f" updates: {u_def}\n params:  {p_def}")
        inner_u, state = tx.update(_as_nodes(pairs, others, paths, u_leaves), state,
                                   _as_nodes(pairs, others, paths, p_leaves), **extra)
        out = list(u_leaves)
        for pr in pairs:
            node = inner_u[pr.path]
            out[pr.ia], out[pr.ib] = node.a, node.b
        for i in others:
            out[i] = inner_u[paths[i]]
        return jax.tree.unflatten(u_def, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# merge_pairs: plain weights from a tree with sibling factors
# --------------------------------------------------------------------------------------------------

_DROP = object()  # marks a factor leaf to remove


def merge_pairs(tree, *, a: str = "lora_a", b: str = "lora_b",
                weight: Union[str, Callable[[str], str], None] = None, scale: Scale = 1.0,
                batch_axes: int = 0, roles: Union[str, Callable[[str], str], None] = None):
    """`tree` with each sibling pair folded into its weight, ``w ← w + scale · a @ b`` (float32 or
    wider accumulation, `w`'s dtype), and the factor leaves removed: from their mapping (dict,
    ``nnx.State``, FrozenDict), and a mapping left empty by that (NNX's ``lora`` submodule) goes too.
    So a Qwix/Tunix-, NNX- or Keras-trained tree becomes the plain parameters of the model without
    LoRA (e.g. ``nnx.update(base_model, merge_pairs(nnx.state(lora_model)))``).

    Pairs are found as in `paired` (`a`, `b`, `scale`, `batch_axes`). The weight of a pair is
    `weight`: None, the sibling named like the ``a`` leaf with `a` cut out and the ``_`` at the cut
    trimmed (Qwix: ``kernel_lora_a`` → ``kernel``); a string, a sibling's name, each leading
    ``../`` one level up (NNX ``LoRALinear``: ``weight="../kernel"``; Keras: ``weight="kernel"``);
    or a function of the ``a`` path returning the weight's path.

    The weight's axes after the batch axes must be its input axes then its output axes (their
    products matching ``a``'s and ``b``'s) — true of Dense kernels and of Qwix's einsum weights
    whose contracting axes lead; for another order pass `roles`, the weight's roles string as in
    `lora_jax.LoRA` (e.g. ``"oio"``), or a function of the ``a`` path returning it.
    """
    name = "lora_jax.merge_pairs"
    paths, leaves, treedef = _flatten(tree)
    pairs, _ = find_pairs(paths, leaves, a=a, b=b, scale=scale, batch_axes=batch_axes, name=name)
    index = {p: i for i, p in enumerate(paths)}
    out = list(leaves)
    for pr in pairs:
        wpath = _weight_path(pr.path, a, weight, name)
        if wpath not in index:
            raise ValueError(f"{name}: the weight of the pair at {pr.path!r} should be {wpath!r}, "
                             "which is not in the tree; pass weight= (a sibling name, '../name', or "
                             "a function of the a path)")
        iw = index[wpath]
        w_roles = roles(pr.path) if callable(roles) else roles
        out[iw] = _merged_weight(leaves[iw], leaves[pr.ia], leaves[pr.ib], pr.scale, batch_axes,
                                 w_roles, wpath, name)
        out[pr.ia] = out[pr.ib] = _DROP
    return _prune(jax.tree.unflatten(treedef, out), name)


def _weight_path(a_path: str, a: str, weight, name: str) -> str:
    head, _, last = a_path.rpartition("/")
    if callable(weight):
        return weight(a_path)
    if weight is None:
        left, right = last.split(a, 1)
        left, right = left.rstrip("_"), right.lstrip("_")
        stem = "_".join(s for s in (left, right) if s)
        if not stem:
            raise ValueError(f"{name}: the factor {a_path!r} is named just {a!r}, so its weight's "
                             "name cannot be derived; pass weight= (e.g. '../kernel' for NNX's "
                             "LoRALinear, 'kernel' for Keras)")
        return (head + "/" if head else "") + stem
    parts = head.split("/") if head else []
    rest = weight
    while rest.startswith("../"):
        if not parts:
            raise ValueError(f"{name}: weight={weight!r} goes above the root from {a_path!r}")
        parts, rest = parts[:-1], rest[3:]
    return "/".join(parts + [rest])


def _merged_weight(w, fa, fb, s, nb, roles, wpath, name):
    w_shape = tuple(jnp.shape(w))
    a_mat, b_mat = gram.node_matrices(jnp.asarray(fa), jnp.asarray(fb),
                                      "i" * (jnp.ndim(fa) - nb - 1))
    I, O = a_mat.shape[-2], b_mat.shape[-1]
    batch, tail = w_shape[:nb], w_shape[nb:]
    if batch != tuple(a_mat.shape[:nb]) or math.prod(tail) != I * O:
        raise ValueError(f"{name}: the weight at {wpath!r} {w_shape} does not fit its factors a "
                         f"{tuple(jnp.shape(fa))}, b {tuple(jnp.shape(fb))} (batch_axes={nb})")
    dtype = jnp.promote_types(jnp.float32, jnp.asarray(w).dtype)
    delta = s * gram.mm(a_mat.astype(dtype), b_mat.astype(dtype))         # (*batch, I, O)
    if roles is None:
        if not any(math.prod(tail[:k]) == I for k in range(len(tail) + 1)):
            raise ValueError(f"{name}: the weight at {wpath!r} {w_shape} does not start with input "
                             f"axes of product {I} (then output axes of product {O}); pass roles= "
                             "(its axis roles, e.g. 'oio')")
        delta = delta.reshape(w_shape)
    else:
        delta = _delta_in_roles(delta, tail, roles, batch, wpath, name)
    return (jnp.asarray(w, dtype) + delta).astype(jnp.asarray(w).dtype)


def _delta_in_roles(delta, tail, roles, batch, wpath, name):
    """The (*batch, I, O) delta moved into a weight whose axes have the roles `roles`."""
    if len(roles) != len(tail) or set(roles) - {"i", "o"}:
        raise ValueError(f"{name}: roles {roles!r} for the weight at {wpath!r} must have one 'i' "
                         f"or 'o' per non-batch axis of {tuple(tail)}")
    ins = [k for k, r in enumerate(roles) if r == "i"]
    outs = [k for k, r in enumerate(roles) if r == "o"]
    if math.prod(tail[k] for k in ins) != delta.shape[-2]:
        raise ValueError(f"{name}: the input axes {roles!r} of the weight at {wpath!r} do not match "
                         f"its factor a (input size {delta.shape[-2]})")
    nb = len(batch)
    d = delta.reshape(batch + tuple(tail[k] for k in ins) + tuple(tail[k] for k in outs))
    order = ins + outs  # d's axis j holds the weight's axis order[j]
    inverse = [order.index(k) for k in range(len(tail))]
    return jnp.transpose(d, tuple(range(nb)) + tuple(nb + j for j in inverse))


def _prune(x, name):
    """Remove `_DROP` leaves from mappings (and nodes holding nothing but `_DROP`)."""
    if x is _DROP:
        return _DROP
    if isinstance(x, Mapping):
        items = {k: _prune(v, name) for k, v in x.items()}
        kept = {k: v for k, v in items.items() if v is not _DROP}
        if items and not kept:
            return _DROP
        return x if len(kept) == len(items) and all(kept[k] is x[k] for k in kept) else type(x)(kept)
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        items = [_prune(v, name) for v in x]
        if any(v is _DROP for v in items):
            raise ValueError(f"{name}: a LoRA factor sits in a {type(x).__name__}, not a mapping; "
                             "it cannot be removed without renumbering its siblings")
        return type(x)(items)
    leaves = jax.tree.leaves(x, is_leaf=lambda y: y is _DROP)
    if leaves and all(v is _DROP for v in leaves):
        return _DROP  # e.g. an NNX Variable that held a factor
    if any(v is _DROP for v in leaves):
        raise ValueError(f"{name}: a LoRA factor sits inside a {type(x).__name__} node beside other "
                         "leaves; it cannot be removed")
    return x


__all__ = ["Pair", "find_pairs", "merge_pairs", "paired"]
