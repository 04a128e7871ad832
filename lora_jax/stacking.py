"""Several adapters on one frozen base: `stack`, `unstack`, `put_adapter`.

A stacked tree holds K adapters of the same targets in each `LoRA` node: `a`, `b` (and a DoRA
`m`) carry an adapter axis right after `w`'s batch axes (so a `scan` over stacked layers slices
the layer axis, as before), and `w` is one shared copy. Run through `lora_jax.wrap` with
``lora_adapter_ids`` (one adapter index per batch row, −1: the base model), every row of a batch
is answered by its own adapter, factored (`lora_jax.product`): the S-LoRA / LoRAX way of serving
many fine-tunes from one base. Swapping an adapter for another of the same shapes
(`put_adapter`) changes values only, so a jitted function never recompiles for it.

Training K adapters on one base in one step needs no stacked node: stack the trainable halves
along a new leading axis and `jax.vmap` the step over it, the frozen half broadcast::

    halves = [lora_jax.split(t)[0] for t in adapted]           # K adapters, one frozen half
    frozen = lora_jax.split(adapted[0])[1]
    train = jax.tree.map(lambda *x: jnp.stack(x), *halves)
    state = jax.vmap(make_opt(lr0).init)(train)                # or any lora_jax optimizer

    def one(t, s, batch, lr):                                  # one adapter's step
        loss, g = jax.value_and_grad(lambda t: loss_fn(lora_jax.combine(t, frozen), batch))(t)
        u, s = make_opt(lr).update(g, s, t)                    # its own lr (a traced scalar)
        return optax.apply_updates(t, u), s, loss

    step = jax.jit(jax.vmap(one))                              # (K, ...) batches and lrs

Every per-adapter quantity (gradient norms for clipping, LoRA-Pro's Gram matrices, Adam's
moments) stays per adapter under `vmap`, so the K trajectories are those of K separate runs
(tests/test_stacking.py checks LoRA, LoRA-Pro efficient and full mode to 1e-5). `stack` turns the
trained adapters into a tree to serve.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.node import LoRA, is_lora
from lora_jax.paths import flatten_with_paths
from lora_jax.quant import is_quantized


def _is_leaf(x) -> bool:
    return x is None or is_lora(x) or is_quantized(x)


def stack(trees: Sequence, *, pad_ranks: bool = False, check_base: bool = True):
    """One tree holding the adapters of `trees` (adapted trees from `lora_jax.apply`, same targets).

    Every LoRA node of the result has ``a: (*batch, K, *in, r)``, ``b: (*batch, K, r, *out)`` (and
    DoRA's ``m: (*batch, K, *out)``) and the first tree's `w`. The trees must agree everywhere
    else: the same structure, the same LoRA targets, roles, scales, dropout and DoRA-ness, the
    same frozen weights (compared when ``check_base``; skip it when they are the same arrays) and
    the same plain leaves (a per-adapter head cannot be served per row: fold it into a LoRA
    target, or keep one head). The first mismatch is named.

    Ranks must be equal, or with ``pad_ranks=True`` the smaller adapters are padded with zero
    columns of `a` and zero rows of `b` up to the largest rank: exact for the forward pass and for
    LoRA's gradients (the padded entries get zero gradient). Padding does not change the scale, so
    the adapters must already share it (α ∝ r). For LoRA-Pro the padded Gram matrices are
    singular; its damped pseudo-inverses keep the padded entries at zero and the others on the
    unpadded trajectory (tested), but train unpadded adapters when you can.
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack: no trees given")
    flat = [flatten_with_paths(t, is_leaf=_is_leaf) for t in trees]
    treedef = flat[0][1]
    for k, (_, d) in enumerate(flat[1:], 1):
        if d != treedef:
            raise ValueError(f"stack: tree {k} differs in structure from tree 0 (different targets or "
                             f"model?)\n tree 0: {treedef}\n tree {k}: {d}")
    out = []
    for i, (path, first) in enumerate(flat[0][0]):
        leaves = [f[0][i][1] for f in flat]
        if is_lora(first):
            out.append(_stack_nodes(path, leaves, pad_ranks, check_base))
        else:
            for k, leaf in enumerate(leaves[1:], 1):
                if is_lora(leaf):
                    raise ValueError(f"stack: {path!r} is a LoRA node in tree {k} but not in tree 0")
                if not _same(first, leaf, check=True):
                    raise ValueError(f"stack: {path!r} differs between tree 0 and tree {k}; only LoRA "
                                     "factors may differ between stacked adapters (a shared base and "
                                     "shared plain leaves)")
            out.append(first)
    return jax.tree.unflatten(treedef, out)


def _stack_nodes(path: str, nodes: list, pad_ranks: bool, check_base: bool) -> LoRA:
    first = nodes[0]
    for k, n in enumerate(nodes[1:], 1):
        if not is_lora(n):
            raise ValueError(f"stack: {path!r} is a LoRA node in tree 0 but not in tree {k}")
        for field in ("roles", "scale", "dropout"):
            if getattr(n, field) != getattr(first, field):
                raise ValueError(f"stack: {path!r} has {field} {getattr(first, field)!r} in tree 0 and "
                                 f"{getattr(n, field)!r} in tree {k}; stacked adapters share it "
                                 "(for ranks that differ: give α ∝ r so that α/r agrees)")
        if (n.m is None) != (first.m is None):
            raise ValueError(f"stack: {path!r} is a DoRA node in one of tree 0 and tree {k} only")
        if any(x.num_adapters is not None for x in (first, n)):
            raise ValueError(f"stack: {path!r} already holds stacked adapters; unstack it first")
        if not _same(first.w, n.w, check=check_base):
            raise ValueError(f"stack: the frozen weight at {path!r} differs between tree 0 and tree "
                             f"{k}: adapters stacked on one base must be made from the same base")
    if first.num_adapters is not None:
        raise ValueError(f"stack: {path!r} already holds stacked adapters; unstack it first")
    ranks = [n.rank for n in nodes]
    r = max(ranks)
    if len(set(ranks)) > 1 and not pad_ranks:
        raise ValueError(f"stack: {path!r} has ranks {ranks}; pass pad_ranks=True to pad them with zeros "
                         f"to rank {r} (exact for the forward pass and LoRA's gradients)")
    nb = first.num_batch_axes

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, r - x.shape[axis])
        return jnp.pad(x, widths)

    a = jnp.stack([pad(n.a, n.a.ndim - 1) for n in nodes], axis=nb)
    b = jnp.stack([pad(n.b, nb) for n in nodes], axis=nb)
    m = None if first.m is None else jnp.stack([n.m for n in nodes], axis=nb)
    return dataclasses.replace(first, a=a, b=b, m=m)


def _same(x, y, *, check: bool) -> bool:
    if x is y:
        return True
    lx, dx = jax.tree.flatten(x)
    ly, dy = jax.tree.flatten(y)
    if dx != dy or any(np.shape(u) != np.shape(v) or jnp.result_type(u) != jnp.result_type(v)
                       for u, v in zip(lx, ly)):
        return False
    return not check or all(bool(jnp.array_equal(u, v)) for u, v in zip(lx, ly))


def num_adapters(tree) -> int:
    """K of a stacked tree (`stack`); a ValueError if it holds no stacked node."""
    counts = {n.num_adapters for n in jax.tree.leaves(tree, is_leaf=is_lora) if is_lora(n)} - {None}
    if not counts:
        raise ValueError("this tree holds no stacked adapters (build one with lora_jax.stack)")
    if len(counts) > 1:
        raise ValueError(f"this tree's LoRA nodes hold different numbers of adapters: {sorted(counts)}")
    return counts.pop()


def _node_slice(node: LoRA, k, rank: int | None = None) -> LoRA:
    nb = node.num_batch_axes
    take = lambda x: None if x is None else jnp.take(x, k, axis=nb)
    a, b = take(node.a), take(node.b)
    if rank is not None:
        a, b = a[..., :rank], jax.lax.slice_in_dim(b, 0, rank, axis=nb)
    return dataclasses.replace(node, a=a, b=b, m=take(node.m))


def unstack(tree, ranks: Sequence[int] | None = None) -> list:
    """The K single-adapter trees of a stacked tree (each sharing its `w` arrays). `ranks` (one per
    adapter, applied to every node) drops the zero padding `stack(..., pad_ranks=True)` added."""
    k = num_adapters(tree)
    if ranks is not None and len(ranks) != k:
        raise ValueError(f"unstack: {len(ranks)} ranks for {k} adapters")
    return [jax.tree.map(lambda n: _node_slice(n, i, None if ranks is None else ranks[i])
                         if is_lora(n) else n, tree, is_leaf=is_lora) for i in range(k)]


def put_adapter(stacked, k: int, tree):
    """`stacked` with adapter `k` replaced by the single adapter of `tree` (same targets and
    shapes): a hot swap. Only values change, so jitted functions of `stacked` do not recompile."""
    n = num_adapters(stacked)
    if not 0 <= k < n:
        raise ValueError(f"put_adapter: adapter index {k} outside [0, {n})")
    s_flat, s_def = flatten_with_paths(stacked, is_leaf=_is_leaf)
    t_flat, t_def = flatten_with_paths(tree, is_leaf=_is_leaf)
    if s_def != t_def:
        raise ValueError("put_adapter: the tree differs in structure from the stacked tree")
    out = []
    for (path, s), (_, t) in zip(s_flat, t_flat):
        if is_lora(s):
            if not is_lora(t) or t.num_adapters is not None:
                raise ValueError(f"put_adapter: {path!r} must be a single-adapter LoRA node")
            old = _node_slice(s, k)
            for field in ("a", "b", "m"):
                u, v = getattr(old, field), getattr(t, field)
                if (u is None) != (v is None) or (u is not None and u.shape != v.shape):
                    raise ValueError(f"put_adapter: {path!r} field {field}: stacked slot has shape "
                                     f"{None if u is None else u.shape}, the new adapter "
                                     f"{None if v is None else v.shape}")
            nb = s.num_batch_axes
            put = lambda x, v: None if x is None else _set_along(x, nb, k, v)
            s = dataclasses.replace(s, a=put(s.a, t.a), b=put(s.b, t.b), m=put(s.m, t.m))
        out.append(s)
    return jax.tree.unflatten(s_def, out)


def _set_along(x, axis: int, k: int, v):
    index = (slice(None),) * axis + (k,)
    return x.at[index].set(v.astype(x.dtype))


__all__ = ["num_adapters", "put_adapter", "stack", "unstack"]
