"""The optax transformations of this library: LoRA-Pro (both modes), the Riemannian preconditioner
and LoRA+.

Each acts on the trainable half of an adapted tree (`lora_jax.split`), whose `LoRA` nodes hold the
factors; `lora_jax.factor_pairs` finds the pairs and puts results back, the per-pair math is in
`lora_jax.projection` (LoRA-Pro) and `lora_jax.preconditioning` (Riemannian). Leaves that are not
LoRA nodes (a new head, say) pass through, or get plain AdamW in `lora_pro_adamw`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from lora_jax import gram
from lora_jax.factor_pairs import (WarnOnce, compute_dtype_of, full_shape, map_lora_gradients,
                                   node_matrices, require_params, with_factors, zip_lora)
from lora_jax.gram import mT, mm
from lora_jax.node import is_lora
from lora_jax.preconditioning import precondition_matrices
from lora_jax.projection import DEFAULT_DAMPING, X_CHOICES, adjust_matrices, equivalent_kernel_gradient
from lora_jax.sharding import moment_sharding

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


# --------------------------------------------------------------------------------------------------
# lora_pro(): the SGD-form adjustment as a stateless transformation
# --------------------------------------------------------------------------------------------------

def lora_pro(*, x: str = "sylvester", damping: float = DEFAULT_DAMPING, rcond: float | None = None,
             compute_dtype=None) -> optax.GradientTransformation:
    """LoRA-Pro's gradient adjustment (Theorem 2.1) as a stateless optax transformation.

    For every `LoRA` node, replaces LoRA's ``(∂L/∂a, ∂L/∂b)`` by the adjusted pair whose equivalent
    gradient is the projection ``P_B g + g P_A − P_B g P_A`` of the full gradient onto the adapters'
    tangent space (see the module docstring), with X chosen by `x`. Each node's own ``scale`` is
    used. Other leaves pass through untouched. Stacked (leading) axes are batched, and the r×r
    eigendecompositions of all nodes of one rank run as one stacked `eigh` (module docstring).

    * ``optax.chain(lora_pro(), optax.sgd(lr))`` is exact LoRA-Pro SGD;
    * ``optax.chain(lora_pro(), optax.adamw(lr))`` is the paper's "efficient" mode (r-sized Adam
      states fed the adjusted gradients).

    Args:
      x: "sylvester" (default; closest to the original gradients), "zero" or "symmetric".
      damping: δ in the damped pseudo-inverse ``1/(λ+δ)`` of the r×r Gram matrices.
      rcond: eigenvalues below ``rcond·λ_max`` count as zero (default ``10·r·eps(compute_dtype)``).
      compute_dtype: dtype of the small algebra; None means float32 (also for bf16 factors).

    ``update(updates, state, params)`` requires `params`: the trainable tree the gradients were
    taken with respect to.
    """
    if not (isinstance(x, str) and x in X_CHOICES):
        raise ValueError(f"x must be one of {X_CHOICES}, got {x!r}")
    compute_dtype = compute_dtype_of(compute_dtype)
    return map_lora_gradients(
        "lora_pro", lambda a, b, ga, gb, scale, eigs: adjust_matrices(
            a, b, ga, gb, scale, x=x, eigs=eigs), compute_dtype, _gram_eigh(damping, rcond))


def _gram_eigh(damping, rcond):
    """`gram_eigh` with fixed damping/rcond, as the `decompose` of `gram.grouped`."""
    return lambda g: gram.gram_eigh(g, damping=damping, rcond=rcond)


# --------------------------------------------------------------------------------------------------
# lora_pro_adamw(): Algorithm 2 (full-shape Adam moments per adapted weight)
# --------------------------------------------------------------------------------------------------

class LoraProAdamWState(NamedTuple):
    """count, and Adam moments: for each LoRA node an (*batch, I, O) array (the adapted kernel in
    matrix form, in axes first), for any other trainable leaf an array of its shape."""

    count: jax.Array
    mu: Any
    nu: Any


class _AdamW(NamedTuple):
    """One step's hyperparameters, in the compute dtype."""
    b1: Any
    b2: Any
    eps: Any
    lr: Any
    wd: Any
    bc1: Any
    bc2: Any
    dtype: Any


def lora_pro_adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, mu_dtype=None, *,
                   damping: float = DEFAULT_DAMPING, rcond: float | None = None,
                   compute_dtype=None) -> optax.GradientTransformation:
    """LoRA-Pro with AdamW, the paper's Algorithm 2 ("full" mode), per adapted weight:

    1. ``g̃ = s·B gA' + s·gB' A`` with (gA', gB') from Theorem 2.1 with X = 0 (any X gives the same
       g̃; it is the projection of the full gradient onto the adapters' tangent space);
    2. full-shape Adam on g̃: ``M ← β1 M + (1−β1) g̃``, ``V ← β2 V + (1−β2) g̃²``,
       ``U = M̂ / (√V̂ + ε)`` with bias corrections ``M̂ = M/(1−β1ᵗ)``, ``V̂ = V/(1−β2ᵗ)``;
    3. pull U back as a full gradient: ``gA_U = s·BᵀU``, ``gB_U = s·U Aᵀ``;
    4. adjust (gA_U, gB_U) with Theorem 2.1 and the Sylvester X, and step
       ``A ← A − lr·gA''``, ``B ← B − lr·gB''``.

    Memory: M and V have the full shape of each adapted weight (stored as (*batch, I, O) in kernel
    orientation, float32 unless `mu_dtype` is set for M) — the same optimizer state as full
    fine-tuning for those weights; nothing else is kept but the step count. Other trainable leaves
    (a new head, say) get plain AdamW with moments of their own shape.

    Weight decay (differs from the reference): frozen weights stay frozen. The reference "full" mode
    decays the whole W, scaling the frozen W0 by (1 − lr·λ) and A, B by √(1 − lr·λ). Here only the
    adapters are scaled by √(1 − lr·λ), so the adapter's contribution ``s·B A`` shrinks by exactly
    (1 − lr·λ) per step — AdamW's decoupled decay of W, but towards W0 instead of towards 0. Other
    trainable leaves get AdamW's ``−lr·λ·p``.

    `learning_rate` may be a float or an optax schedule; the transformation works inside
    `optax.chain` and with `optax.inject_hyperparams`. ``update`` requires `params` (the trainable
    tree). Extra keyword arguments: `damping`, `rcond`, `compute_dtype` as in `lora_pro`. (Under
    `inject_hyperparams`, pass dtypes as strings, e.g. ``mu_dtype="bfloat16"``, or name them in
    ``static_args``: optax treats any callable argument, such as ``jnp.bfloat16``, as a schedule.)
    """
    compute_dtype = compute_dtype_of(compute_dtype)
    warn = WarnOnce("lora_pro_adamw")
    m_dtype = compute_dtype if mu_dtype is None else mu_dtype

    def init_fn(params):
        warn.check(params)

        def zeros(p, dtype_for_lora):
            if is_lora(p):  # sharded like the adapted weight when the factors are (FSDP)
                return jnp.zeros(full_shape(p), dtype_for_lora, device=moment_sharding(p.a, p.b, p.roles))
            return jnp.zeros_like(p, dtype=mu_dtype or p.dtype)

        mu = jax.tree.map(lambda p: zeros(p, m_dtype), params, is_leaf=is_lora)
        nu = jax.tree.map(lambda p: zeros(p, compute_dtype) if is_lora(p) else jnp.zeros_like(p),
                          params, is_leaf=is_lora)
        return LoraProAdamWState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        require_params(params, "lora_pro_adamw")
        u_leaves, p_leaves, u_def, paths = zip_lora(updates, params, "lora_pro_adamw")
        warn.check(params)
        mu_leaves, mu_def = jax.tree.flatten(state.mu)
        nu_leaves = jax.tree.leaves(state.nu)
        if len(mu_leaves) != len(u_leaves):
            raise ValueError("lora_pro_adamw: the state was initialised for a different tree")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = optax.safe_increment(state.count)
        t = count.astype(compute_dtype)
        c = lambda v: jnp.asarray(v, compute_dtype)
        hp = _AdamW(b1=b1, b2=b2, eps=eps, lr=c(lr), wd=c(weight_decay), bc1=1 - c(b1) ** t,
                    bc2=1 - c(b2) ** t, dtype=compute_dtype)

        # Per node the matrix forms and Grams; then one eigh per (rank, dtype) group, not per node:
        # each solver call is a separate launch, and per-node calls made a GPU step ~3× LoRA's.
        mats = {}
        for i, (path, u, p, m) in enumerate(zip(paths, u_leaves, p_leaves, mu_leaves)):
            if is_lora(u):
                if m.shape != full_shape(p):
                    raise ValueError(f"lora_pro_adamw: state moment at {path} has shape {m.shape}, "
                                     f"expected {full_shape(p)}")
                mats[i] = node_matrices(p, u, compute_dtype)
        node_eigs = dict(zip(mats, gram.grouped_factor_eighs(
            [(a, b) for a, b, _, _ in mats.values()], _gram_eigh(damping, rcond))))

        out, new_mu, new_nu = [], [], []
        for i, (u, p, m, v) in enumerate(zip(u_leaves, p_leaves, mu_leaves, nu_leaves)):
            if is_lora(u):
                upd, m, v = _lora_adam_step(u, p.scale, mats[i], node_eigs[i], m, v, hp)
                m = m.astype(m_dtype)
            else:
                upd, m, v = _leaf_adam_step(u, p, m, v, hp)
                m = m.astype(mu_dtype or u.dtype)
            out.append(upd)
            new_mu.append(m)
            new_nu.append(v)
        return (jax.tree.unflatten(u_def, out),
                LoraProAdamWState(count=count, mu=jax.tree.unflatten(mu_def, new_mu),
                                  nu=jax.tree.unflatten(mu_def, new_nu)))

    return optax.GradientTransformation(init_fn, update_fn)


def _lora_adam_step(u, s, mats, eigs, m, v, hp: _AdamW):
    """Algorithm 2 for one node: the projected full-shape gradient, Adam on it, pulled back to the
    factors and adjusted again (steps 1–4 of `lora_pro_adamw`), plus the decay towards the base."""
    a, b, ga, gb = mats
    ga0, gb0 = adjust_matrices(a, b, ga, gb, s, x="zero", eigs=eigs)
    g_eq = equivalent_kernel_gradient(a, b, ga0, gb0, s)        # (…, I, O)
    m = hp.b1 * m.astype(hp.dtype) + (1 - hp.b1) * g_eq
    v = hp.b2 * v + (1 - hp.b2) * g_eq * g_eq
    upd = (m / hp.bc1) / (jnp.sqrt(v / hp.bc2) + hp.eps)
    ga_u, gb_u = s * mm(upd, mT(b)), s * mm(mT(a), upd)
    ga2, gb2 = adjust_matrices(a, b, ga_u, gb_u, s, x="sylvester", eigs=eigs)
    shrink = jnp.sqrt(jnp.maximum(1 - hp.lr * hp.wd, 0.0)) - 1
    return with_factors(u, -hp.lr * ga2 + shrink * a, -hp.lr * gb2 + shrink * b), m, v


def _leaf_adam_step(u, p, m, v, hp: _AdamW):
    """Plain AdamW for a trainable leaf that is not a LoRA node."""
    g = u.astype(hp.dtype)
    m = hp.b1 * m.astype(hp.dtype) + (1 - hp.b1) * g
    v2 = hp.b2 * v.astype(hp.dtype) + (1 - hp.b2) * g * g
    step = (m / hp.bc1) / (jnp.sqrt(v2 / hp.bc2) + hp.eps) + hp.wd * p.astype(hp.dtype)
    return (-hp.lr * step).astype(u.dtype), m, v2.astype(v.dtype)


# --------------------------------------------------------------------------------------------------
# riemannian(): the r×r preconditioner
# --------------------------------------------------------------------------------------------------

def riemannian(reg: float = 1e-2, *, compute_dtype=None) -> optax.GradientTransformation:
    """Stateless transformation applying the r×r Riemannian preconditioner (Zhang & Pilanci, 2024;
    `lora_jax.preconditioning`) to every `LoRA` node: ``ga ← ga (b bᵀ + λI)⁻¹``,
    ``gb ← (aᵀa + λI)⁻¹ gb``. One `eigh` per group of nodes sharing rank and compute dtype.

    ``optax.chain(lora_jax.riemannian(), optax.sgd(lr))`` is scaled GD,
    ``optax.chain(lora_jax.riemannian(), optax.adamw(lr))`` the preconditioned AdamW.

    Args:
      reg: λ, added to the Gram matrices' eigenvalues before inversion (PEFT's default 1e-2). It
        keeps step 0 (b = 0, where the a-gradient is 0 anyway) and rank-deficient factors finite.
      compute_dtype: dtype of the r×r algebra (None: float32, also for bf16 factors).

    ``update(updates, state, params)`` requires `params` (the trainable tree).
    """
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    return map_lora_gradients("riemannian", lambda a, b, ga, gb, scale, eigs: precondition_matrices(
        a, b, ga, gb, reg, eigs=eigs), compute_dtype_of(compute_dtype), jnp.linalg.eigh)


# --------------------------------------------------------------------------------------------------
# LoRA+ (Hayou, Ghosh & Yu, 2024): a larger learning rate for `b` than for `a`
# --------------------------------------------------------------------------------------------------

def scale_b(ratio: float) -> optax.GradientTransformation:
    """Multiply the `b` component of every `LoRA` node in the updates by `ratio` (stateless)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def f(u):
            if is_lora(u) and u.b is not None:
                return dataclasses.replace(u, b=(u.b * ratio).astype(u.b.dtype))
            return u

        return jax.tree.map(f, updates, is_leaf=is_lora), state

    return optax.GradientTransformation(init_fn, update_fn)


def loraplus(inner: optax.GradientTransformation, ratio: float = 16.0) -> optax.GradientTransformation:
    """LoRA+: ``inner`` (e.g. ``optax.adamw(lr)``) with `b`'s learning rate multiplied by `ratio`.

    LoRA+ trains ``b`` (the paper's B, the factor that starts at zero) with learning rate
    ``ratio · lr`` and ``a`` with ``lr`` (PEFT's ``create_loraplus_optimizer``). Every optax
    optimizer built on ``scale_by_learning_rate`` produces updates that are linear in the learning
    rate, so this is exactly "run the inner optimizer, then multiply the `b` part of its update by
    `ratio`": the inner optimizer's decoupled weight decay on `b` is scaled along with it, as in
    PyTorch param groups with a larger lr.

    Equivalent to ``optax.chain(inner, scale_b(ratio))``; wrapping the inner optimizer (rather than
    asking for a chain position) keeps the scaling after the learning rate, where it must be:
    scaling *gradients* before Adam would be normalised away. Works with schedules and
    ``optax.inject_hyperparams`` on the inner optimizer, and with LoRA-Pro's transformations, e.g.
    ``loraplus(optax.chain(lora_pro(), optax.adamw(lr)))``.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    return optax.chain(inner, scale_b(ratio))


__all__ = ["LoraProAdamWState", "lora_pro", "lora_pro_adamw", "loraplus", "riemannian", "scale_b"]
