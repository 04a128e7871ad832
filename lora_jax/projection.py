"""LoRA-Pro's math (Wang et al., ICLR 2025) on matrix-form factors; the optax transformations built
on it are in `lora_jax.optimizers`.

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
damped pseudo-inverses in the same eigenbases (see `lora_jax.gram`): at LoRA's step 0 (b = 0)
BᵀB = 0, its pseudo-inverse is 0, and since gA = s·Bᵀg = 0 there too, gA' = 0 and
gB' = (1/s²) gB (AAᵀ)⁻¹ — exactly the limit, with nothing infinite on the way.

Grouped r×r algebra. The transformations (`lora_jax.optimizers`) do not call `eigh` per adapted weight: they first
form every node's Gram matrices (the per-weight products b bᵀ and aᵀa), then diagonalise all Gram
matrices of the same rank and compute dtype with ONE `eigh` on their stack (leading, scan-stacked
axes folded in; see `lora_jax.gram.grouped_factor_eighs`), and finally use each node's slice of the result
(`adjust_matrices(..., eigs=...)`): the Sylvester solve in the eigenbases and the pseudo-inverses
are elementwise or r-sized products from there on. The result equals the per-node computation;
only the number of solver calls changes (one per (rank, dtype) group instead of two per weight).

Caveat: the "closest" property of the Sylvester X assumes ``gA Aᵀ = Bᵀ gB``, which holds for true
LoRA gradients (and for gradients clipped/scaled as a whole), not for LoRA dropout > 0, where the
a/b gradients see different inputs. The projection property holds regardless.
"""

from __future__ import annotations

import jax.numpy as jnp

from lora_jax import gram
from lora_jax.gram import mT, mm

X_CHOICES = ("sylvester", "zero", "symmetric")
DEFAULT_DAMPING = 1e-8


def adjust_matrices(a, b, ga, gb, scale, *, x="sylvester", eigs=None, damping=DEFAULT_DAMPING,
                    rcond=None):
    """Theorem 2.1 on matrix-form factors: ``(ga', gb')`` from LoRA's ``(ga, gb)``.

    a, ga: (..., I, r);  b, gb: (..., r, O);  scale: s. `x` is one of ``X_CHOICES`` or an explicit
    (..., r, r) array X (paper notation). In kernel orientation the formulas read

        ga' = (1/s²) ga (b bᵀ)⁺ + a Xᵀ
        gb' = (1/s²) (aᵀa)⁺ gb [I − bᵀ (b bᵀ)⁺ b] − Xᵀ b

    `eigs` = ``(eig(b bᵀ), eig(aᵀ a))`` from `gram.factor_eighs` may be passed to reuse them.
    """
    eb, ea = gram.factor_eighs(a, b, damping=damping, rcond=rcond) if eigs is None else eigs
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
            y = gram.sylvester_in_eigenbasis(ct, eb, ea)
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
    eb, ea = gram.factor_eighs(a, b, damping=damping, rcond=rcond)
    ct = -(1.0 / scale**2) * eb.inv[..., :, None] * mm(mT(mm(ga, eb.vec)), mm(a, ea.vec))
    y = gram.sylvester_in_eigenbasis(ct, eb, ea)
    return mm(mm(eb.vec, y), mT(ea.vec))


def equivalent_kernel_gradient(a, b, ga, gb, scale):
    """``s·(ga b + a gb)`` (I, O): the kernel-orientation equivalent gradient ``g̃ᵀ``.

    One product over a rank axis of 2r, ``[ga, a] @ [b; gb]``: a single (I, O)-sized output
    instead of two and their sum."""
    return scale * mm(jnp.concatenate([ga, a], -1), jnp.concatenate([b, gb], -2))


__all__ = ["DEFAULT_DAMPING", "X_CHOICES", "adjust_matrices", "equivalent_kernel_gradient", "sylvester_x"]
