"""`split`, `combine` and `merge`: moving between adapted, trainable/frozen and plain trees."""

from __future__ import annotations

import dataclasses

import jax

from lora_jax.node import LoRA, factor_shapes, is_lora, magnitude_shape, merge_node
from lora_jax.paths import Selector, compile_selector, flatten_with_paths
from lora_jax.quant import is_quantized


def _is_leaf(x) -> bool:  # a quantized weight stays whole (in the frozen half)
    return x is None or is_lora(x) or is_quantized(x)


def split(tree, trainable: Selector = None):
    """``(trainable, frozen)`` halves of an adapted tree, each of the full tree's structure.

    `trainable` holds each LoRA node's `a` and `b` (and a DoRA node's magnitude `m`; its `w` is
    None) plus the leaves selected by
    the `trainable` selector (a regex over '/'-joined paths, a list of them, or a predicate), such
    as a new classification head; `frozen` holds everything else (each LoRA node's `w`). Holes are
    None. Differentiate with respect to the trainable half only, so frozen weights get no gradient.
    """
    extra = compile_selector(trainable, "trainable")
    leaves, treedef = flatten_with_paths(tree, is_leaf=_is_leaf)
    train, frozen = [], []
    for path, leaf in leaves:
        if is_lora(leaf):
            _check_node(leaf, path, need_w=True, need_ab=True)
            train.append(dataclasses.replace(leaf, w=None))
            frozen.append(dataclasses.replace(leaf, a=None, b=None, m=None))
        elif leaf is not None and extra(path, leaf):
            train.append(leaf)
            frozen.append(None)
        else:
            train.append(None)
            frozen.append(leaf)
    return jax.tree.unflatten(treedef, train), jax.tree.unflatten(treedef, frozen)


def combine(trainable, frozen):
    """Inverse of `split`: one adapted tree from its trainable and frozen halves."""
    t_leaves, t_def = flatten_with_paths(trainable, is_leaf=_is_leaf)
    f_leaves, f_def = flatten_with_paths(frozen, is_leaf=_is_leaf)
    if t_def != f_def:
        raise ValueError("combine: trainable and frozen trees have different structures; they must "
                         f"come from the same `split`.\n trainable: {t_def}\n frozen:    {f_def}")
    out = []
    for (path, t), (_, f) in zip(t_leaves, f_leaves):
        if is_lora(t) or is_lora(f):
            if not (is_lora(t) and is_lora(f)):
                raise ValueError(f"combine: {path!r} is a LoRA node in one tree only")
            if (t.scale, t.roles, t.dropout) != (f.scale, f.roles, f.dropout):
                raise ValueError(f"combine: {path!r} has different LoRA settings in the two trees")
            if f.m is not None:
                raise ValueError(f"combine: {path!r} has a DoRA magnitude `m` in the frozen tree; "
                                 "it belongs to the trainable half")
            node = dataclasses.replace(t, w=f.w)
            _check_node(node, path, need_w=True, need_ab=True)
            out.append(node)
        elif t is not None and f is not None:
            raise ValueError(f"combine: {path!r} is set in both the trainable and the frozen tree")
        else:
            out.append(t if t is not None else f)
    return jax.tree.unflatten(t_def, out)


def merge(tree):
    """Plain params: every LoRA node becomes ``w + scale·a@b`` (float32 maths, `w`'s dtype), a
    DoRA node ``m ⊙ w_eff / ‖w_eff‖`` (`lora_jax.node`).

    A node with a quantized `w` (`lora_jax.quantize`, QLoRA) merges into a float array of `w`'s
    dequantized dtype; quantized weights outside LoRA nodes stay quantized."""
    leaves, treedef = flatten_with_paths(tree, is_leaf=is_lora)
    out = []
    for path, leaf in leaves:
        if is_lora(leaf):
            _check_node(leaf, path, need_w=True, need_ab=True)
            if leaf.num_adapters is not None:
                raise ValueError(f"merge: the LoRA node at {path!r} holds {leaf.num_adapters} stacked "
                                 "adapters, which have no single merged weight; merge each of "
                                 "lora_jax.unstack(tree)")
            leaf = merge_node(leaf)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _check_node(node: LoRA, path: str, *, need_w: bool, need_ab: bool) -> None:
    if need_w and node.w is None:
        raise ValueError(f"LoRA node at {path!r} has no `w`: this is a trainable half from `split`; "
                         "`combine` it with its frozen half first")
    if need_ab and (node.a is None or node.b is None):
        raise ValueError(f"LoRA node at {path!r} has no `a`/`b`: this is a frozen half from `split`; "
                         "`combine` it with its trainable half first")
    rank = node.a.shape[-1]
    a_shape, b_shape = factor_shapes(node.w.shape, node.roles, rank)
    m_shape = magnitude_shape(node.w.shape, node.roles)
    k = node.num_adapters
    if k is not None:  # stacked adapters (`lora_jax.stack`): an adapter axis after w's batch axes
        nb = node.num_batch_axes
        a_shape, b_shape, m_shape = (s[:nb] + (k,) + s[nb:] for s in (a_shape, b_shape, m_shape))
    if tuple(node.a.shape) != a_shape or tuple(node.b.shape) != b_shape:
        raise ValueError(f"LoRA node at {path!r}: w {tuple(node.w.shape)} with roles {node.roles!r} "
                         f"needs a {a_shape} and b {b_shape}, got a {tuple(node.a.shape)} and "
                         f"b {tuple(node.b.shape)}")
    if node.m is not None and tuple(node.m.shape) != m_shape:
        raise ValueError(f"LoRA node at {path!r}: w {tuple(node.w.shape)} with roles {node.roles!r} "
                         f"needs a DoRA magnitude m {m_shape}, "
                         f"got {tuple(node.m.shape)}")
