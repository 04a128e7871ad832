"""How the LoRA optimizers find adapter pairs in a gradient tree and put results back.

An optax transformation of this library receives `updates` (the gradients) and `params` (the
trainable half from `lora_jax.split`) of the same structure, with `LoRA` nodes as leaves. For each
node it needs the factors and their gradients in *matrix form* (kernel orientation, leading stacked
axes kept as batch axes)::

    a, ga: (*batch, I, r)        b, gb: (*batch, r, O)

and then a node of the update's own shapes and dtypes holding the results (`with_factors`).
`map_lora_gradients` is the whole loop for a stateless transformation whose per-pair math needs the
eigendecompositions of the two r×r Gram matrices, taken once per (rank, dtype) group
(`lora_jax.gram.grouped_factor_eighs`).

A DoRA node (`lora_jax.node`) is such a pair too: its (a, b) gradients are those of the direction
``w + scale·a@b`` (the norm being a constant), and the gradient of its magnitude `m` passes through
every per-pair transformation unchanged, as a plain leaf would.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import optax

from lora_jax import gram
from lora_jax.node import LoRA, is_lora
from lora_jax.paths import path_str


def require_params(params, name: str) -> None:
    if params is None:
        raise ValueError(f"{name} needs the current parameters: call `update(updates, state, params)` "
                         "with params = the trainable tree (from `lora_jax.split`) the gradients were "
                         "taken with respect to. Its LoRA nodes' `a`, `b` and `scale` are read.")


def zip_lora(updates, params, name: str):
    """Flatten `updates` and `params` (LoRA nodes as leaves) and check that they match.
    Returns ``(update leaves, param leaves, treedef, paths)``."""
    u_leaves, u_def = jax.tree.flatten(updates, is_leaf=is_lora)
    p_with_paths, p_def = jax.tree.flatten_with_path(params, is_leaf=is_lora)
    if u_def != p_def:
        raise ValueError(f"{name}: `updates` and `params` have different tree structures; pass as "
                         "params the same (trainable) tree the gradients were taken with respect to, "
                         "not the combined or frozen tree.\n"
                         f" updates: {u_def}\n params:  {p_def}")
    paths = [path_str(k) for k, _ in p_with_paths]
    p_leaves = [p for _, p in p_with_paths]
    for path, u, p in zip(paths, u_leaves, p_leaves):
        _check_pair(name, path, u, p)
    return u_leaves, p_leaves, u_def, paths


def _check_pair(name: str, path: str, u, p) -> None:
    if is_lora(u) != is_lora(p):
        raise ValueError(f"{name}: {path} is a LoRA node in one of updates/params only")
    if not is_lora(u):
        return
    if p.a is None or p.b is None:
        raise ValueError(f"{name}: the LoRA node at {path} in params has no a/b (a frozen "
                         "half?); pass the trainable tree from `lora_jax.split`")
    if u.a is None or u.b is None:
        raise ValueError(f"{name}: the LoRA node at {path} in updates has no a/b gradient")
    if (u.m is None) != (p.m is None):
        raise ValueError(f"{name}: the LoRA node at {path} has a DoRA magnitude `m` in one of "
                         "updates/params only")
    if u.a.shape != p.a.shape or u.b.shape != p.b.shape or u.roles != p.roles:
        raise ValueError(f"{name}: shapes at {path} do not match: updates a {u.a.shape}, "
                         f"b {u.b.shape}; params a {p.a.shape}, b {p.b.shape}")


def compute_dtype_of(dtype):
    """The dtype of the small algebra: `dtype`, or float32 when None (also for bf16 factors)."""
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a float dtype, got {dtype}")
    return dtype


class WarnOnce:
    """One warning per transformation when its parameter tree holds no LoRA node at all."""

    def __init__(self, name: str):
        self.name, self.done = name, False

    def check(self, tree) -> None:
        if self.done:
            return
        if not any(is_lora(x) for x in jax.tree.leaves(tree, is_leaf=is_lora)):
            self.done = True
            warnings.warn(f"{self.name}: no LoRA node found in the parameter tree; this "
                          "transformation does nothing. Pass the trainable tree from "
                          "`lora_jax.split(lora_jax.apply(params, ...))`.", stacklevel=3)


def node_matrices(p: LoRA, u: LoRA, dtype):
    """``(a, b, ga, gb)`` in matrix form and `dtype`, from a node of params and its gradient."""
    a, b = gram.node_matrices(p.a, p.b, p.roles)
    ga, gb = gram.node_matrices(u.a, u.b, p.roles)
    return a.astype(dtype), b.astype(dtype), ga.astype(dtype), gb.astype(dtype)


def with_factors(u: LoRA, ga, gb) -> LoRA:
    """`u` with matrix-form `ga`, `gb` put back in its factors' shapes and dtypes; anything else
    of `u` (a DoRA node's magnitude gradient `m`) as it is."""
    return dataclasses.replace(u, a=ga.reshape(u.a.shape).astype(u.a.dtype),
                               b=gb.reshape(u.b.shape).astype(u.b.dtype))


def full_shape(p: LoRA) -> tuple:
    """``(*batch, I, O)``: the adapted weight of node `p` in matrix form."""
    a, b = jax.eval_shape(lambda a, b: gram.node_matrices(a, b, p.roles), p.a, p.b)
    return a.shape[:-1] + (b.shape[-1],)


def map_lora_gradients(name: str, adjust, compute_dtype, decompose) -> optax.GradientTransformation:
    """A stateless transformation: each LoRA node's (grad a, grad b), in matrix form and
    `compute_dtype`, becomes ``adjust(a, b, ga, gb, scale, eigs)``; other leaves pass through.

    ``eigs = (decompose(b bᵀ), decompose(aᵀa))`` for that node, where `decompose` (an (N, r, r)
    stack → pytree of arrays with leading axis N, acting per matrix) is called once per
    (rank, compute dtype) group on the stacked Gram matrices of all its nodes (`gram.grouped`)."""
    warn = WarnOnce(name)

    def init_fn(params):
        warn.check(params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        require_params(params, name)
        u_leaves, p_leaves, u_def, _ = zip_lora(updates, params, name)
        warn.check(params)
        mats = {i: node_matrices(p, u, compute_dtype)
                for i, (u, p) in enumerate(zip(u_leaves, p_leaves)) if is_lora(u)}
        eigs = gram.grouped_factor_eighs([(a, b) for a, b, _, _ in mats.values()], decompose)
        out = list(u_leaves)
        for (i, (a, b, ga, gb)), e in zip(mats.items(), eigs):
            out[i] = with_factors(u_leaves[i], *adjust(a, b, ga, gb, p_leaves[i].scale, e))
        return jax.tree.unflatten(u_def, out), state

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["WarnOnce", "compute_dtype_of", "full_shape", "map_lora_gradients", "node_matrices",
           "require_params", "with_factors", "zip_lora"]
