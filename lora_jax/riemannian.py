"""The Riemannian (scaled-GD) preconditioner for LoRA (Zhang & Pilanci, 2024), as in PEFT's
``create_riemannian_optimizer``.

Paper notation (W = W0 + s·B A):  ``gA ← (BᵀB + λI)⁻¹ gA``,  ``gB ← gB (AAᵀ + λI)⁻¹``.
Kernel orientation (a = Aᵀ, b = Bᵀ):  ``ga ← ga (b bᵀ + λI)⁻¹``,  ``gb ← (aᵀa + λI)⁻¹ gb``.

Both inverses are r×r, taken with `eigh` in float32 (or `compute_dtype`). The `eigh` runs once per
group of adapted weights sharing rank and compute dtype, on the stack of all their Gram matrices
(b bᵀ and aᵀa, stacked leading axes folded in), not once per weight; each weight then uses its
slice of the eigendecompositions (see `lora_jax._gram.grouped_factor_eighs`). As in PEFT, the
adapter scale s is not folded into the Gram matrices. Put it before the optimizer:
``optax.chain(lora_jax.riemannian(), optax.sgd(lr))`` is scaled GD,
``optax.chain(lora_jax.riemannian(), optax.adamw(lr))`` the preconditioned AdamW.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from lora_jax._gram import mT, mm
from lora_jax.lora_pro import _compute_dtype, map_lora_gradients


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


def riemannian(reg: float = 1e-2, *, compute_dtype=None) -> optax.GradientTransformation:
    """Stateless transformation applying the r×r Riemannian preconditioner to every `LoRA` node.

    Args:
      reg: λ, added to the Gram matrices' eigenvalues before inversion (PEFT's default 1e-2). It
        keeps step 0 (b = 0, where the a-gradient is 0 anyway) and rank-deficient factors finite.
      compute_dtype: dtype of the r×r algebra (None: float32, also for bf16 factors).

    ``update(updates, state, params)`` requires `params` (the trainable tree).
    """
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    return map_lora_gradients("riemannian", lambda a, b, ga, gb, scale, eigs: precondition_matrices(
        a, b, ga, gb, reg, eigs=eigs), _compute_dtype(compute_dtype), jnp.linalg.eigh)


__all__ = ["precondition_matrices", "riemannian"]
