"""Qwix-adapted NNX models next to lora_jax's own nodes: the same base weights and factors.

`qwix_factors(lm)` reads a Qwix-LoRA model's factor leaves; `own_nodes(base, factors, scale)` puts
them into lora_jax `LoRA` nodes on the base model's state (each weight's leading axes are its inputs,
as its ``a`` factor's are: true of Dense kernels and of einsum weights whose contracting axes lead),
so one model can run through Qwix's interception or through `lora_jax.wrap` on identical adapters.
"""

from __future__ import annotations

import jax
from flax import nnx

from lora_jax.node import LoRA, is_lora
from lora_jax.paths import flatten_with_paths, path_str


def by_path(tree, is_leaf=None) -> dict:
    """{'/'-joined path: leaf} of a tree."""
    return dict(flatten_with_paths(tree, is_leaf=is_leaf)[0])


def qwix_factors(lm) -> dict:
    """{'/'-joined path: array} of a Qwix-LoRA model's `nnx.LoRAParam` leaves."""
    return by_path(nnx.as_pure(nnx.state(lm, nnx.LoRAParam)))


def own_nodes(base, factors: dict, scale: float):
    """``(graphdef, state)`` of `base` with each weight that has Qwix factors in `factors`
    (``<path>_lora_a``/``_lora_b``) replaced by ``LoRA(w, a, b, scale, roles)``."""
    graphdef, state = nnx.split(base)

    def node(path, w):
        p = path_str(path)
        if p + "_lora_a" not in factors:
            return w
        a, b = factors[p + "_lora_a"], factors[p + "_lora_b"]
        return LoRA(w=w, a=a, b=b, scale=scale, roles="i" * (a.ndim - 1) + "o" * (b.ndim - 1))

    return graphdef, jax.tree_util.tree_map_with_path(node, state)


def flat_nodes(tree) -> dict:
    """{'/'-joined path: LoRA node} of a tree."""
    return {p: x for p, x in by_path(tree, is_leaf=is_lora).items() if is_lora(x)}


__all__ = ["by_path", "flat_nodes", "own_nodes", "qwix_factors"]
