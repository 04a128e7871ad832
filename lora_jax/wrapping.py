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
import quax

from lora_jax import policy
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
    """
    @functools.wraps(fn)
    def wrapped(*args, lora_dropout_key=None, **kwargs):
        with policy.settings(strict=strict, dropout_key=lora_dropout_key):
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


def _is_node(x) -> bool:
    return isinstance(x, quax.ArrayValue)
