"""The Riemannian (scaled-GD) preconditioner's math for LoRA (Zhang & Pilanci, 2024), as in PEFT's
``create_riemannian_optimizer``; `lora_jax.riemannian` (in `lora_jax.optimizers`) applies it.

Paper notation (W = W0 + s·B A):  ``gA ← (BᵀB + λI)⁻¹ gA``,  ``gB ← gB (AAᵀ + λI)⁻¹``.
Kernel orientation (a = Aᵀ, b = Bᵀ):  ``ga ← ga (b bᵀ + λI)⁻¹``,  ``gb ← (aᵀa + λI)⁻¹ gb``.

Both inverses are r×r, taken with `eigh`. As in PEFT, the adapter scale s is not folded into the
Gram matrices.
"""

from __future__ import annotations

import jax.numpy as jnp

from lora_jax.gram import mT, mm


def precondition_matrices(a, b, ga, gb, reg, *, eigs=None):
    """``(ga (b bᵀ + λI)⁻¹, (aᵀa + λI)⁻¹ gb)`` for matrix-form factors (..., I, r), (..., r, O).

    With ``b bᵀ = U diag(λ_b) Uᵀ`` the first is ``ga U diag(1/(max(λ_b, 0) + λ)) Uᵀ`` (likewise for
    aᵀa). `eigs` = ``(eigh(b bᵀ), eigh(aᵀa))`` (each an (eigenvalues, eigenvectors) pair) may be
    passed to reuse them."""
    if eigs is None:
        eigs = jnp.linalg.eigh(mm(b, mT(b))), jnp.linalg.eigh(mm(mT(a), a))
    (lb, ub), (la, ua) = eigs
    inv_b = 1.0 / (jnp.maximum(lb, 0.0) + reg)
    inv_a = 1.0 / (jnp.maximum(la, 0.0) + reg)
    ga2 = mm(mm(ga, ub) * inv_b[..., None, :], mT(ub))
    gb2 = mm(ua * inv_a[..., None, :], mm(mT(ua), gb))
    return ga2, gb2


__all__ = ["precondition_matrices"]
