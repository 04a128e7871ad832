"""The Riemannian (scaled-GD) preconditioner for LoRA (Zhang & Pilanci, 2024), as in PEFT's
``create_riemannian_optimizer``.

Paper notation (W = W0 + s·B A):  ``gA ← (BᵀB + λI)⁻¹ gA``,  ``gB ← gB (AAᵀ + λI)⁻¹``.
Kernel orientation (a = Aᵀ, b = Bᵀ):  ``ga ← ga (b bᵀ + λI)⁻¹``,  ``gb ← (aᵀa + λI)⁻¹ gb``.

Both inverses are r×r, taken with `eigh` in float32 (or `compute_dtype`) and batched over stacked
leading axes. As in PEFT, the adapter scale s is not folded into the Gram matrices. Put it before
the optimizer: ``optax.chain(lora_jax.riemannian(), optax.sgd(lr))`` is scaled GD,
``optax.chain(lora_jax.riemannian(), optax.adamw(lr))`` the preconditioned AdamW.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from lora_jax._gram import mT, mm
from lora_jax.lora_pro import _compute_dtype, map_lora_gradients


def precondition_matrices(a, b, ga, gb, reg):
    """``(ga (b bᵀ + λI)⁻¹, (aᵀa + λI)⁻¹ gb)`` for matrix-form factors (..., I, r), (..., r, O)."""
    lb, ub = jnp.linalg.eigh(mm(b, mT(b)))
    la, ua = jnp.linalg.eigh(mm(mT(a), a))
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
    return map_lora_gradients("riemannian", lambda a, b, ga, gb, scale: precondition_matrices(
        a, b, ga, gb, reg), _compute_dtype(compute_dtype))


__all__ = ["precondition_matrices", "riemannian"]
