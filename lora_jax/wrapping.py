"""`wrap`: run a function on trees holding `LoRA` nodes, with products executed factored.

The engine is `quax` (a maintained custom-interpreter library): `LoRA` is a `quax.ArrayValue`, and
the rules of `lora_jax.rules` say how primitives act on it. Higher-order primitives (jit, scan,
while, cond) are quax's own; `remat` is added there. Every primitive without a rule materialises
``w + scale·a@b`` with a `LoRAMaterializationWarning` naming the primitive, or raises under
``strict=True``.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import quax

from lora_jax import policy
from lora_jax.node import is_lora
from lora_jax import rules  # noqa: F401  (registers the quax rules `wrap` runs with)


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

    And ``lora_adapter_ids``, for trees holding several adapters (`lora_jax.stack`): an int array
    of shape (batch,), one adapter index per row of the batch (−1: the base model alone). Each
    product with a stacked node then runs every row with its own adapter, factored: the row's `a`
    and `b` are gathered (rank-sized per row), never a weight per row or per adapter. Products
    take the batch as their input's leading axis. Nodes holding one adapter apply to every row.
    Concrete ids are checked against the number of adapters; under `jit` an index ≥ K selects no
    adapter (the base model), as −1 does.
    """
    @functools.wraps(fn)
    def wrapped(*args, lora_dropout_key=None, lora_adapter_ids=None, **kwargs):
        ids = None if lora_adapter_ids is None else _check_ids(lora_adapter_ids, (fn, args, kwargs))
        with policy.settings(strict=strict, dropout_key=lora_dropout_key, adapter_ids=ids):
            return _call_flat(fn, args, kwargs)

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
    leaves, treedef = jax.tree.flatten((fn, args, kwargs), is_leaf=_is_node)
    out_tree = []

    def flat_fn(*leaves):
        fn, args, kwargs = jax.tree.unflatten(treedef, leaves)
        out, tree = jax.tree.flatten(fn(*args, **kwargs), is_leaf=_is_node)
        out_tree.append(tree)
        return out

    out = quax.quaxify(flat_fn)(*leaves)
    return jax.tree.unflatten(out_tree[-1], out)


def _check_ids(ids, trees):
    """`ids` as an int32 (batch,) array; concrete ones checked against every stacked node's K."""
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"lora_adapter_ids must be a 1-D integer array (one adapter index per batch "
                         f"row, -1 for the base model), got shape {ids.shape} and dtype {ids.dtype}")
    counts = {n.num_adapters for n in jax.tree.leaves(trees, is_leaf=is_lora) if is_lora(n)} - {None}
    if not counts:
        raise ValueError("lora_adapter_ids given, but no LoRA node holds stacked adapters: build the "
                         "tree with lora_jax.stack([adapted_1, ..., adapted_K])")
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)
        k = min(counts)
        if bad.size and (bad.min() < -1 or bad.max() >= k):
            raise ValueError(f"lora_adapter_ids must lie in [-1, {k - 1}] (the tree holds {k} "
                             f"adapters), got values in [{bad.min()}, {bad.max()}]")
    return ids.astype(jnp.int32)


def _is_node(x) -> bool:
    return isinstance(x, quax.ArrayValue)
