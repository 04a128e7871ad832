"""The optax transformations of this library: LoRA-Pro (both modes), the Riemannian preconditioner
and LoRA+.

Each acts on the trainable half of an adapted tree (`lora_jax.split`), whose `LoRA` nodes hold the
factors; `lora_jax.factor_pairs` finds the pairs and puts results back, the per-pair math is in
`lora_jax.projection` (LoRA-Pro) and `lora_jax.preconditioning` (Riemannian). Leaves that are not
LoRA nodes (a new head, say) pass through, or get plain AdamW in `lora_pro_adamw`.

DoRA nodes (``apply(..., dora=True)``): each transformation acts on their (a, b) gradients as on a
LoRA node's (the gradient of the direction ``w + scale·a@b``, the norm a constant), and treats the
magnitude `m` as a plain leaf: `lora_pro`, `riemannian`, `scale_b` and `add_decay_towards_base` pass
its gradient through unchanged (so ``chain(lora_pro(), optax.adamw(lr))`` gives `m` plain AdamW), and
`lora_pro_adamw` routes `m` to its AdamW for other leaves.
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
    used. Other leaves, and a DoRA node's `m` gradient, pass through untouched. Stacked (leading) axes are batched, and the r×r
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
    """State of `scale_by_lora_pro_adam`: the step count and, for each LoRA node, Adam's moments of
    its full-shape equivalent gradient, (*batch, I, O) (the adapted kernel in matrix form, input
    axes first); None at every other leaf."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_lora_pro_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, mu_dtype=None, *,
                           damping: float = DEFAULT_DAMPING, rcond: float | None = None,
                           compute_dtype=None) -> optax.GradientTransformation:
    """Steps 1–4 of LoRA-Pro's Algorithm 2, without the learning rate, for every `LoRA` node:

    1. ``g̃ = s·B gA' + s·gB' A`` with (gA', gB') from Theorem 2.1 with X = 0 (any X gives the same
       g̃: the projection of the full gradient onto the adapters' tangent space);
    2. full-shape Adam on g̃: ``M ← β1 M + (1−β1) g̃``, ``V ← β2 V + (1−β2) g̃²``,
       ``U = M̂ / (√V̂ + ε)`` with ``M̂ = M/(1−β1ᵗ)``, ``V̂ = V/(1−β2ᵗ)``;
    3. U pulled back as a full gradient: ``gA_U = s·BᵀU``, ``gB_U = s·U Aᵀ``;
    4. (gA_U, gB_U) adjusted with Theorem 2.1 and the Sylvester X: the node's update.

    So ``chain(scale_by_lora_pro_adam(), optax.scale_by_learning_rate(lr))`` steps
    ``A ← A − lr·gA''``, ``B ← B − lr·gB''``. M and V have the full shape of each adapted weight
    (`LoraProAdamWState`; M in `mu_dtype`, else the compute dtype; sharded like the weight when the
    factors are). Leaves that are not LoRA nodes, and a DoRA node's `m`, pass through unchanged and
    get no state: route them to another optimizer, as `lora_pro_adamw` does. ``update`` requires `params`.
    """
    compute_dtype = compute_dtype_of(compute_dtype)
    m_dtype = compute_dtype if mu_dtype is None else jnp.dtype(mu_dtype)
    warn = WarnOnce("lora_pro_adamw")

    def init_fn(params):
        warn.check(params)

        def zeros(p, dtype):  # sharded like the adapted weight when the factors are (FSDP)
            return jnp.zeros(full_shape(p), dtype, device=moment_sharding(p.a, p.b, p.roles))

        moments = lambda dtype: jax.tree.map(lambda p: zeros(p, dtype) if is_lora(p) else None,
                                             params, is_leaf=is_lora)
        return LoraProAdamWState(count=jnp.zeros([], jnp.int32), mu=moments(m_dtype),
                                 nu=moments(compute_dtype))

    def update_fn(updates, state, params=None):
        require_params(params, "lora_pro_adamw")
        u_leaves, p_leaves, u_def, paths = zip_lora(updates, params, "lora_pro_adamw")
        warn.check(params)
        nodes = [i for i, u in enumerate(u_leaves) if is_lora(u)]
        mu_leaves, mu_def = jax.tree.flatten(state.mu)
        nu_leaves = jax.tree.leaves(state.nu)
        if len(mu_leaves) != len(nodes) or len(nu_leaves) != len(nodes):
            raise ValueError("lora_pro_adamw: the state was initialised for a different tree")
        count = optax.safe_increment(state.count)
        t = count.astype(compute_dtype)
        hp = _Adam(b1=b1, b2=b2, eps=eps, bc1=1 - jnp.asarray(b1, compute_dtype) ** t,
                   bc2=1 - jnp.asarray(b2, compute_dtype) ** t, dtype=compute_dtype)
        # Per node the matrix forms and Grams; then one eigh per (rank, dtype) group, not per node:
        # each solver call is a separate launch, and per-node calls made a GPU step ~3x LoRA's.
        mats = []
        for i, m in zip(nodes, mu_leaves):
            if m.shape != full_shape(p_leaves[i]):
                raise ValueError(f"lora_pro_adamw: state moment at {paths[i]} has shape {m.shape}, "
                                 f"expected {full_shape(p_leaves[i])}")
            mats.append(node_matrices(p_leaves[i], u_leaves[i], compute_dtype))
        eigs = gram.grouped_factor_eighs([(a, b) for a, b, _, _ in mats], _gram_eigh(damping, rcond))
        out, new_mu, new_nu = list(u_leaves), [], []
        for i, mat, e, m, v in zip(nodes, mats, eigs, mu_leaves, nu_leaves):
            out[i], m, v = _lora_adam_direction(u_leaves[i], p_leaves[i].scale, mat, e, m, v, hp)
            new_mu.append(m.astype(m_dtype))
            new_nu.append(v)
        return (jax.tree.unflatten(u_def, out),
                LoraProAdamWState(count=count, mu=jax.tree.unflatten(mu_def, new_mu),
                                  nu=jax.tree.unflatten(mu_def, new_nu)))

    return optax.GradientTransformation(init_fn, update_fn)


class _Adam(NamedTuple):
    """One step's Adam constants, in the compute dtype."""
    b1: Any
    b2: Any
    eps: Any
    bc1: Any
    bc2: Any
    dtype: Any


def _lora_adam_direction(u, s, mats, eigs, m, v, hp: _Adam):
    """Steps 1–4 of `scale_by_lora_pro_adam` for one node: its update and new moments."""
    a, b, ga, gb = mats
    ga0, gb0 = adjust_matrices(a, b, ga, gb, s, x="zero", eigs=eigs)
    g_eq = equivalent_kernel_gradient(a, b, ga0, gb0, s)        # (…, I, O)
    m = hp.b1 * m.astype(hp.dtype) + (1 - hp.b1) * g_eq
    v = hp.b2 * v + (1 - hp.b2) * g_eq * g_eq
    upd = (m / hp.bc1) / (jnp.sqrt(v / hp.bc2) + hp.eps)
    ga_u, gb_u = s * mm(upd, mT(b)), s * mm(mT(a), upd)
    return with_factors(u, *adjust_matrices(a, b, ga_u, gb_u, s, x="sylvester", eigs=eigs)), m, v


def add_decay_towards_base(weight_decay: ScalarOrSchedule,
                           learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """AdamW's decoupled weight decay for LoRA nodes, towards the frozen weight instead of 0.

    Adds ``c·a`` and ``c·b`` to each node's update, ``c = (1 − √(1 − lr·λ)) / lr``, so that after
    `optax.scale_by_learning_rate` (``−lr·…``) the factors are scaled by ``√(1 − lr·λ)`` and the
    adapter's contribution ``s·a@b`` by exactly ``1 − lr·λ``: AdamW's decay of W, with W0 kept.
    (The LoRA-Pro reference decays the whole W, scaling the frozen W0 too; a frozen weight that
    changes is no longer frozen.) `learning_rate` must be the one given to
    ``scale_by_learning_rate`` (a schedule is read at this transformation's own step count, which
    advances in step with that one's). Other leaves pass through, and so does a DoRA node's `m`
    (its base, the initial norm, is not in the tree; `lora_pro_adamw` gives `m` AdamW's own decay).
    """

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        require_params(params, "add_decay_towards_base")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        wd = weight_decay(state.count) if callable(weight_decay) else weight_decay

        def decay(u, p):
            if not is_lora(u):
                return u
            lr_ = jnp.asarray(lr, jnp.float32)
            shrink = 1 - jnp.sqrt(jnp.maximum(1 - lr_ * wd, 0.0))
            c = jnp.where(lr_ > 0, shrink / jnp.where(lr_ > 0, lr_, 1.0), 0.5 * wd)  # lr → 0: λ/2
            return dataclasses.replace(u, a=(u.a + c * p.a).astype(u.a.dtype),
                                       b=(u.b + c * p.b).astype(u.b.dtype))

        out = jax.tree.map(decay, updates, params, is_leaf=is_lora)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro_adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, mu_dtype=None, *,
                   damping: float = DEFAULT_DAMPING, rcond: float | None = None,
                   compute_dtype=None) -> optax.GradientTransformation:
    """LoRA-Pro with AdamW, the paper's Algorithm 2 ("full" mode), from optax pieces:

    * LoRA nodes: ``chain(scale_by_lora_pro_adam(b1, b2, eps, mu_dtype), add_decay_towards_base(
      weight_decay, learning_rate), optax.scale_by_learning_rate(learning_rate))`` — full-shape Adam
      on the projected gradient, pulled back to the factors and adjusted (`scale_by_lora_pro_adam`),
      decay towards the frozen weight (`add_decay_towards_base`);
    * every other trainable leaf (a new head, say), and each DoRA node's magnitude `m`:
      ``optax.adamw(learning_rate, b1, b2, eps, weight_decay, mu_dtype=mu_dtype)`` (for `m` the
      simplest correct choice: the paper's Algorithm 2 knows no magnitude, and a PyTorch AdamW over
      PEFT's DoRA parameters treats it the same way, decay towards 0 included),

    split by `optax.partition`. Memory: M and V have the full shape of each adapted weight — the
    same optimizer state as full fine-tuning for those weights — plus step counts.

    `learning_rate` may be a float or an optax schedule; the transformation works inside
    `optax.chain` (e.g. after ``optax.clip_by_global_norm``, which scales the raw factor gradients
    by one factor read from their norm; the projection being linear, the projected gradient is
    scaled by the same factor) and with `optax.inject_hyperparams`. ``update`` requires `params` (the trainable tree). `damping`,
    `rcond`, `compute_dtype` as in `lora_pro`. (Under `inject_hyperparams`, pass dtypes as strings,
    e.g. ``mu_dtype="bfloat16"``, or name them in ``static_args``: optax treats any callable
    argument, such as ``jnp.bfloat16``, as a schedule.)
    """
    lora_tx = optax.chain(
        scale_by_lora_pro_adam(b1, b2, eps, mu_dtype, damping=damping, rcond=rcond,
                               compute_dtype=compute_dtype),
        optax.identity() if _is_zero(weight_decay) else add_decay_towards_base(weight_decay, learning_rate),
        optax.scale_by_learning_rate(learning_rate))
    other_tx = optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mu_dtype=mu_dtype)
    split = optax.partition({"lora": lora_tx, "other": other_tx}, _lora_or_other)

    def update_fn(updates, state, params=None):
        # checked before optax.partition masks params with the updates' labels, whose own error
        # on a mismatch would not say what to pass
        require_params(params, "lora_pro_adamw")
        zip_lora(updates, params, "lora_pro_adamw")
        return split.update(updates, state, params)

    return optax.GradientTransformation(split.init, update_fn)


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _lora_or_other(tree):
    """optax.partition labels: "lora" for a LoRA node (its a and b), "other" for anything else and
    for a DoRA node's `m`."""
    def label(x):
        if not is_lora(x):
            return "other"
        return "lora" if x.m is None else dataclasses.replace(x, a="lora", b="lora", m="other")

    return jax.tree.map(label, tree, is_leaf=is_lora)


# --------------------------------------------------------------------------------------------------
# riemannian(): the r×r preconditioner
# --------------------------------------------------------------------------------------------------

def riemannian(reg: float = 1e-2, *, compute_dtype=None) -> optax.GradientTransformation:
    """Stateless transformation applying the r×r Riemannian preconditioner (Zhang & Pilanci, 2024;
    `lora_jax.preconditioning`) to every `LoRA` node: ``ga ← ga (b bᵀ + λI)⁻¹``,
    ``gb ← (aᵀa + λI)⁻¹ gb`` (a DoRA node's `m` gradient passes through). One `eigh` per group of
    nodes sharing rank and compute dtype.

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

    A DoRA node's `m` keeps the inner optimizer's update (learning rate ``lr``).
    Equivalent to ``optax.chain(inner, scale_b(ratio))``; wrapping the inner optimizer (rather than
    asking for a chain position) keeps the scaling after the learning rate, where it must be:
    scaling *gradients* before Adam would be normalised away. Works with schedules and
    ``optax.inject_hyperparams`` on the inner optimizer, and with LoRA-Pro's transformations, e.g.
    ``loraplus(optax.chain(lora_pro(), optax.adamw(lr)))``.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    return optax.chain(inner, scale_b(ratio))


__all__ = ["LoraProAdamWState", "add_decay_towards_base", "lora_pro", "lora_pro_adamw", "loraplus",
           "riemannian", "scale_b", "scale_by_lora_pro_adam"]
