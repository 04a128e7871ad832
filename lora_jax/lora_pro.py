"""LoRA-Pro (Wang et al., ICLR 2025) as optax gradient transformations.

Notation. The paper writes an adapted weight as ``W = W0 + s·B A`` with W of shape (m, n) = (out, in),
B (m, r), A (r, n). This project stores kernels as Flax does, ``K = Wᵀ`` of shape (in, out), with
factors ``a = Aᵀ`` (in, r) and ``b = Bᵀ`` (r, out), ``K = K0 + s·a@b``. Gradients transpose the same
way: ``gA = (∂L/∂a)ᵀ``, ``gB = (∂L/∂b)ᵀ``. Multi-axis kernels are reshaped to matrices (in axes →
I, out axes → O) and any leading axes (scan-stacked layers) are batch axes of every operation below.

The math (paper orientation, g = ∂L/∂W):

* LoRA's gradients are ``gA = s·Bᵀg`` and ``gB = s·g Aᵀ``; one SGD step on (A, B) moves W along the
  *equivalent gradient* ``g̃ = s·B gA + s·gB A``.
* Theorem 2.1: for every r×r matrix X, the adjusted gradients

      gA' = (1/s²) (BᵀB)⁻¹ gA + X A
      gB' = (1/s²) [I − B (BᵀB)⁻¹ Bᵀ] gB (AAᵀ)⁻¹ − B X

  give the same equivalent gradient, the orthogonal projection of g onto the tangent space
  {B Y + Z A}:  ``g̃' = P_B g + g P_A − P_B g P_A``, so ``⟨g, g̃'⟩ = ‖g̃'‖² ≥ 0``.
* X choices (`x=`): ``"sylvester"`` (default) — the X that keeps (gA', gB') closest to (gA, gB),
  the solution of ``(BᵀB) X + X (AAᵀ) = −(1/s²)(BᵀB)⁻¹ gA Aᵀ``; ``"zero"`` — X = 0;
  ``"symmetric"`` — ``X = −(1/2s²)(BᵀB)⁻¹ Bᵀ gB (AAᵀ)⁻¹``, which splits the shared part
  ``P_B g P_A`` equally between the B·gA' and the gB'·A terms.

The Sylvester equation is solved with two r×r `eigh` calls: with BᵀB = U diag(λ) Uᵀ and
AAᵀ = V diag(μ) Vᵀ, ``X = U [(Uᵀ C V)_ij / (λ_i + μ_j)] Vᵀ``. Inverses of the Gram matrices are
damped pseudo-inverses in the same eigenbases (see `lora_jax._gram`): at LoRA's step 0 (b = 0)
BᵀB = 0, its pseudo-inverse is 0, and since gA = s·Bᵀg = 0 there too, gA' = 0 and
gB' = (1/s²) gB (AAᵀ)⁻¹ — exactly the limit, with nothing infinite on the way.

Grouped r×r algebra. The transformations below do not call `eigh` per adapted weight: they first
form every node's Gram matrices (the per-weight products b bᵀ and aᵀa), then diagonalise all Gram
matrices of the same rank and compute dtype with ONE `eigh` on their stack (leading, scan-stacked
axes folded in; see `lora_jax._gram.grouped_factor_eighs`), and finally use each node's slice of the result
(`adjust_matrices(..., eigs=...)`): the Sylvester solve in the eigenbases and the pseudo-inverses
are elementwise or r-sized products from there on. The result equals the per-node computation;
only the number of solver calls changes (one per (rank, dtype) group instead of two per weight).

Caveat: the "closest" property of the Sylvester X assumes ``gA Aᵀ = Bᵀ gB``, which holds for true
LoRA gradients (and for gradients clipped/scaled as a whole), not for LoRA dropout > 0, where the
a/b gradients see different inputs. The projection property holds regardless.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from lora_jax import _gram
from lora_jax._gram import mT, mm
from lora_jax.node import LoRA, is_lora
from lora_jax.sharding import moment_sharding

X_CHOICES = ("sylvester", "zero", "symmetric")
DEFAULT_DAMPING = 1e-8

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


# --------------------------------------------------------------------------------------------------
# Matrix-form math (kernel orientation, batched over leading axes)
# --------------------------------------------------------------------------------------------------

def adjust_matrices(a, b, ga, gb, scale, *, x="sylvester", eigs=None, damping=DEFAULT_DAMPING,
                    rcond=None):
    """Theorem 2.1 on matrix-form factors: ``(ga', gb')`` from LoRA's ``(ga, gb)``.

    a, ga: (..., I, r);  b, gb: (..., r, O);  scale: s. `x` is one of ``X_CHOICES`` or an explicit
    (..., r, r) array X (paper notation). In kernel orientation the formulas read

        ga' = (1/s²) ga (b bᵀ)⁺ + a Xᵀ
        gb' = (1/s²) (aᵀa)⁺ gb [I − bᵀ (b bᵀ)⁺ b] − Xᵀ b

    `eigs` = ``(eig(b bᵀ), eig(aᵀ a))`` from `_gram.factor_eighs` may be passed to reuse them.
    """
    eb, ea = _gram.factor_eighs(a, b, damping=damping, rcond=rcond) if eigs is None else eigs
    inv_s2 = 1.0 / (scale * scale)
    U, V = eb.vec, ea.vec
    gaU = mm(ga, U)                                   # ga U            (I, r)
    be = mm(mT(U), b)                                 # Uᵀ b            (r, O)
    ga1 = inv_s2 * mm(gaU * eb.inv[..., None, :], mT(U))
    gbbe = mm(gb, mT(be))                             # gb bᵀ U         (r, r)
    resid = gb - mm(gbbe * eb.inv[..., None, :], be)  # gb (I − bᵀ (bbᵀ)⁺ b)
    gb1 = inv_s2 * mm(V * ea.inv[..., None, :], mm(mT(V), resid))

    if isinstance(x, str):
        if x == "zero":
            return ga1, gb1
        aV = mm(a, V)                                 # a V             (I, r)
        if x == "sylvester":
            # Uᵀ C V with C = −(1/s²)(BᵀB)⁺ gA Aᵀ = −(1/s²) (bbᵀ)⁺ gaᵀ a
            ct = -inv_s2 * eb.inv[..., :, None] * mm(mT(gaU), aV)
            y = _gram.sylvester_in_eigenbasis(ct, eb, ea)
        elif x == "symmetric":
            # Uᵀ X V with X = −(1/2s²)(BᵀB)⁺ Bᵀ gB (AAᵀ)⁺ = −(1/2s²)(bbᵀ)⁺ b gbᵀ (aᵀa)⁺
            y = (-0.5 * inv_s2) * eb.inv[..., :, None] * mm(be, mm(mT(gb), V)) * ea.inv[..., None, :]
        else:
            raise ValueError(f"x must be one of {X_CHOICES} or an (r, r) array, got {x!r}")
        # X = U Y Vᵀ:  a Xᵀ = (aV) Yᵀ Uᵀ,  Xᵀ b = V Yᵀ (Uᵀ b)
        return ga1 + mm(mm(aV, mT(y)), mT(U)), gb1 - mm(mm(V, mT(y)), be)
    xm = jnp.asarray(x, ga1.dtype)
    return ga1 + mm(a, mT(xm)), gb1 - mm(mT(xm), b)


def sylvester_x(a, b, ga, scale, *, damping=DEFAULT_DAMPING, rcond=None):
    """The Sylvester X (paper notation) for matrix-form factors: ``(BᵀB) X + X (AAᵀ) = C``."""
    eb, ea = _gram.factor_eighs(a, b, damping=damping, rcond=rcond)
    ct = -(1.0 / scale**2) * eb.inv[..., :, None] * mm(mT(mm(ga, eb.vec)), mm(a, ea.vec))
    y = _gram.sylvester_in_eigenbasis(ct, eb, ea)
    return mm(mm(eb.vec, y), mT(ea.vec))


def equivalent_kernel_gradient(a, b, ga, gb, scale):
    """``s·(ga b + a gb)`` (I, O): the kernel-orientation equivalent gradient ``g̃ᵀ``.

    One product over a rank axis of 2r, ``[ga, a] @ [b; gb]``: a single (I, O)-sized output
    instead of two and their sum."""
    return scale * mm(jnp.concatenate([ga, a], -1), jnp.concatenate([b, gb], -2))


def _node_mats(p: LoRA, u: LoRA, dtype):
    a, b = _gram.node_matrices(p.a, p.b, p.roles)
    ga, gb = _gram.node_matrices(u.a, u.b, p.roles)
    return a.astype(dtype), b.astype(dtype), ga.astype(dtype), gb.astype(dtype)


def _with_ab(u: LoRA, ga, gb) -> LoRA:
    return LoRA(w=u.w, a=ga.reshape(u.a.shape).astype(u.a.dtype),
                b=gb.reshape(u.b.shape).astype(u.b.dtype), scale=u.scale, roles=u.roles,
                dropout=u.dropout)


# --------------------------------------------------------------------------------------------------
# Tree plumbing shared by the LoRA optimizers
# --------------------------------------------------------------------------------------------------

def require_params(params, name: str):
    if params is None:
        raise ValueError(f"{name} needs the current parameters: call `update(updates, state, params)` "
                         "with params = the trainable tree (from `lora_jax.split`) the gradients were "
                         "taken with respect to. Its LoRA nodes' `a`, `b` and `scale` are read.")


def zip_lora(updates, params, name: str):
    """Flatten `updates` and `params` (LoRA nodes as leaves) and check that they match."""
    u_leaves, u_def = jax.tree_util.tree_flatten(updates, is_leaf=is_lora)
    p_leaves, p_def = jax.tree_util.tree_flatten(params, is_leaf=is_lora)
    if u_def != p_def:
        raise ValueError(f"{name}: `updates` and `params` have different tree structures; pass as "
                         "params the same (trainable) tree the gradients were taken with respect to, "
                         "not the combined or frozen tree.\n"
                         f" updates: {u_def}\n params:  {p_def}")
    paths = [jax.tree_util.keystr(k) for k, _ in
             jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]]
    for path, u, p in zip(paths, u_leaves, p_leaves):
        if is_lora(u) != is_lora(p):
            raise ValueError(f"{name}: {path} is a LoRA node in one of updates/params only")
        if is_lora(u):
            if p.a is None or p.b is None:
                raise ValueError(f"{name}: the LoRA node at {path} in params has no a/b (a frozen "
                                 "half?); pass the trainable tree from `lora_jax.split`")
            if u.a is None or u.b is None:
                raise ValueError(f"{name}: the LoRA node at {path} in updates has no a/b gradient")
            if u.a.shape != p.a.shape or u.b.shape != p.b.shape or u.roles != p.roles:
                raise ValueError(f"{name}: shapes at {path} do not match: updates a {u.a.shape}, "
                                 f"b {u.b.shape}; params a {p.a.shape}, b {p.b.shape}")
    return u_leaves, p_leaves, u_def, paths


def _compute_dtype(dtype):
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a float dtype, got {dtype}")
    return dtype


class _WarnOnce:
    def __init__(self, name: str):
        self.name, self.done = name, False

    def check(self, tree):
        if self.done:
            return
        if not any(is_lora(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_lora)):
            self.done = True
            warnings.warn(f"{self.name}: no LoRA node found in the parameter tree; this "
                          "transformation does nothing. Pass the trainable tree from "
                          "`lora_jax.split(lora_jax.apply(params, ...))`.", stacklevel=3)


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
    compute_dtype = _compute_dtype(compute_dtype)
    return map_lora_gradients(
        "lora_pro", lambda a, b, ga, gb, scale, eigs: adjust_matrices(
            a, b, ga, gb, scale, x=x, eigs=eigs), compute_dtype, _gram_eigh(damping, rcond))


def _gram_eigh(damping, rcond):
    """`gram_eigh` with fixed damping/rcond, as the `decompose` of `_gram.grouped`."""
    return lambda g: _gram.gram_eigh(g, damping=damping, rcond=rcond)


def map_lora_gradients(name: str, adjust, compute_dtype, decompose) -> optax.GradientTransformation:
    """A stateless transformation: each LoRA node's (grad a, grad b), in matrix form and
    `compute_dtype`, becomes ``adjust(a, b, ga, gb, scale, eigs)``; other leaves pass through.

    ``eigs = (decompose(b bᵀ), decompose(aᵀa))`` for that node, where `decompose` (an (N, r, r)
    stack → pytree of arrays with leading axis N, acting per matrix) is called once per
    (rank, compute dtype) group on the stacked Gram matrices of all its nodes (`_gram.grouped`)."""
    warn = _WarnOnce(name)

    def init_fn(params):
        warn.check(params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        require_params(params, name)
        u_leaves, p_leaves, u_def, _ = zip_lora(updates, params, name)
        warn.check(params)
        mats = {i: _node_mats(p, u, compute_dtype)
                for i, (u, p) in enumerate(zip(u_leaves, p_leaves)) if is_lora(u)}
        eigs = _gram.grouped_factor_eighs([(a, b) for a, b, _, _ in mats.values()], decompose)
        out = list(u_leaves)
        for (i, (a, b, ga, gb)), e in zip(mats.items(), eigs):
            out[i] = _with_ab(u_leaves[i], *adjust(a, b, ga, gb, p_leaves[i].scale, e))
        return jax.tree_util.tree_unflatten(u_def, out), state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# lora_pro_adamw(): Algorithm 2 (full-shape Adam moments per adapted weight)
# --------------------------------------------------------------------------------------------------

class LoraProAdamWState(NamedTuple):
    """count, and Adam moments: for each LoRA node an (*batch, I, O) array (the adapted kernel in
    matrix form, in axes first), for any other trainable leaf an array of its shape."""

    count: jax.Array
    mu: Any
    nu: Any


def _full_shape(p: LoRA):
    a, b = jax.eval_shape(lambda a, b: _gram.node_matrices(a, b, p.roles), p.a, p.b)
    return a.shape[:-1] + (b.shape[-1],)


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
    compute_dtype = _compute_dtype(compute_dtype)
    warn = _WarnOnce("lora_pro_adamw")
    m_dtype = compute_dtype if mu_dtype is None else mu_dtype

    def init_fn(params):
        warn.check(params)

        def zeros(p, dtype_for_lora):
            if is_lora(p):  # sharded like the adapted weight when the factors are (FSDP)
                return jnp.zeros(_full_shape(p), dtype_for_lora, device=moment_sharding(p.a, p.b, p.roles))
            return jnp.zeros_like(p, dtype=mu_dtype or p.dtype)

        mu = jax.tree_util.tree_map(lambda p: zeros(p, m_dtype), params, is_leaf=is_lora)
        nu = jax.tree_util.tree_map(lambda p: zeros(p, compute_dtype) if is_lora(p)
                                    else jnp.zeros_like(p), params, is_leaf=is_lora)
        return LoraProAdamWState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        require_params(params, "lora_pro_adamw")
        u_leaves, p_leaves, u_def, paths = zip_lora(updates, params, "lora_pro_adamw")
        warn.check(params)
        mu_leaves, mu_def = jax.tree_util.tree_flatten(state.mu)
        nu_leaves = jax.tree_util.tree_leaves(state.nu)
        if len(mu_leaves) != len(u_leaves):
            raise ValueError("lora_pro_adamw: the state was initialised for a different tree")

        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = optax.safe_increment(state.count)
        t = count.astype(compute_dtype)
        bc1 = 1 - jnp.asarray(b1, compute_dtype) ** t
        bc2 = 1 - jnp.asarray(b2, compute_dtype) ** t
        lr_c = jnp.asarray(lr, compute_dtype)
        wd = jnp.asarray(weight_decay, compute_dtype)

        # Per node the matrix forms and Grams; then one eigh per (rank, dtype) group, not per node:
        # each solver call is a separate launch, and per-node calls made a GPU step ~3× LoRA's.
        mats = {}
        for i, (path, u, p, m) in enumerate(zip(paths, u_leaves, p_leaves, mu_leaves)):
            if is_lora(u):
                if m.shape != _full_shape(p):
                    raise ValueError(f"lora_pro_adamw: state moment at {path} has shape {m.shape}, "
                                     f"expected {_full_shape(p)}")
                mats[i] = _node_mats(p, u, compute_dtype)
        node_eigs = dict(zip(mats, _gram.grouped_factor_eighs(
            [(a, b) for a, b, _, _ in mats.values()], _gram_eigh(damping, rcond))))

        out, new_mu, new_nu = [], [], []
        for i, (u, p, m, v) in enumerate(zip(u_leaves, p_leaves, mu_leaves, nu_leaves)):
            if is_lora(u):
                s = p.scale
                a, b, ga, gb = mats[i]
                eigs = node_eigs[i]
                ga0, gb0 = adjust_matrices(a, b, ga, gb, s, x="zero", eigs=eigs)
                g_eq = equivalent_kernel_gradient(a, b, ga0, gb0, s)        # (…, I, O)
                m = (b1 * m.astype(compute_dtype) + (1 - b1) * g_eq)
                v = b2 * v + (1 - b2) * g_eq * g_eq
                upd = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
                ga_u, gb_u = s * mm(upd, mT(b)), s * mm(mT(a), upd)
                ga2, gb2 = adjust_matrices(a, b, ga_u, gb_u, s, x="sylvester", eigs=eigs)
                shrink = jnp.sqrt(jnp.maximum(1 - lr_c * wd, 0.0)) - 1
                da = -lr_c * ga2 + shrink * a
                db = -lr_c * gb2 + shrink * b
                out.append(_with_ab(u, da, db))
                new_mu.append(m.astype(m_dtype))
                new_nu.append(v)
            else:
                g = u.astype(compute_dtype)
                m = b1 * m.astype(compute_dtype) + (1 - b1) * g
                v2 = b2 * v.astype(compute_dtype) + (1 - b2) * g * g
                step = (m / bc1) / (jnp.sqrt(v2 / bc2) + eps) + wd * p.astype(compute_dtype)
                out.append((-lr_c * step).astype(u.dtype))
                new_mu.append(m.astype(mu_dtype or u.dtype))
                new_nu.append(v2.astype(v.dtype))
        return (jax.tree_util.tree_unflatten(u_def, out),
                LoraProAdamWState(count=count, mu=jax.tree_util.tree_unflatten(mu_def, new_mu),
                                  nu=jax.tree_util.tree_unflatten(mu_def, new_nu)))

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["LoraProAdamWState", "X_CHOICES", "adjust_matrices", "equivalent_kernel_gradient",
           "lora_pro", "lora_pro_adamw", "sylvester_x"]
