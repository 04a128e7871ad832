"""LoRA+ (Hayou, Ghosh & Yu, 2024): a larger learning rate for `b` than for `a`.

LoRA+ trains ``b`` (the paper's B, the factor that starts at zero) with learning rate
``ratio · lr`` and ``a`` with ``lr`` (PEFT's ``create_loraplus_optimizer``, default ratio 16 in
its docs' examples). Every optax optimizer built on ``scale_by_learning_rate`` produces updates that
are linear in the learning rate, so this is exactly "run the inner optimizer, then multiply the `b`
part of its update by `ratio`": the inner optimizer's decoupled weight decay on `b` is scaled along
with it, as in PyTorch param groups with a larger lr.
"""

from __future__ import annotations

import jax
import optax

from lora_jax.node import LoRA, is_lora


def scale_b(ratio: float) -> optax.GradientTransformation:
    """Multiply the `b` component of every `LoRA` node in the updates by `ratio` (stateless)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def f(u):
            if is_lora(u) and u.b is not None:
                return LoRA(w=u.w, a=u.a, b=(u.b * ratio).astype(u.b.dtype), scale=u.scale,
                            roles=u.roles, dropout=u.dropout)
            return u

        return jax.tree_util.tree_map(f, updates, is_leaf=is_lora), state

    return optax.GradientTransformation(init_fn, update_fn)


def loraplus(inner: optax.GradientTransformation, ratio: float = 16.0) -> optax.GradientTransformation:
    """LoRA+: ``inner`` (e.g. ``optax.adamw(lr)``) with `b`'s learning rate multiplied by `ratio`.

    Equivalent to ``optax.chain(inner, scale_b(ratio))``; wrapping the inner optimizer (rather than
    asking for a chain position) keeps the scaling after the learning rate, where it must be:
    scaling *gradients* before Adam would be normalised away. Works with schedules and
    ``optax.inject_hyperparams`` on the inner optimizer, and with LoRA-Pro's transformations, e.g.
    ``loraplus(optax.chain(lora_pro(), optax.adamw(lr)))``.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    return optax.chain(inner, scale_b(ratio))


__all__ = ["loraplus", "scale_b"]
