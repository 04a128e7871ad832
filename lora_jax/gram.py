"""Small batched linear algebra shared by the LoRA optimizers (LoRA-Pro, Riemannian): r×r Gram
matrices, their eigendecompositions taken in groups, damped pseudo-inverses, the Sylvester solve.

Everything here works on *matrix form* factors in kernel orientation, batched over any leading axes:

    a: (..., I, r)      b: (..., r, O)      K = w + s · a @ b   (K is (..., I, O))

In the paper's notation (W = W0 + s·B A, W of shape (O, I)): A = aᵀ, B = bᵀ, so the Gram matrices
are  BᵀB = b bᵀ  and  A Aᵀ = aᵀ a, both r×r, symmetric positive semi-definite.

Gram matrices are diagonalised with `eigh` (never a general `eig`). Their (pseudo-)inverses are taken
in the eigenbasis: eigenvalues below ``rcond · λ_max`` count as zero (the direction is dropped, as
a pseudo-inverse does), the others are inverted as ``1 / (λ + damping)``. So b = 0 (LoRA's step 0)
gives a zero inverse instead of ``1/δ``, and rank-deficient factors stay finite.

Grouping. The r×r solvers cost next to nothing in FLOPs, but each call is a separate solver launch:
on a GPU, one jitted function making 144 separate 8×8 `eigh` calls took 44 ms, one `eigh` of the
stacked (144, 8, 8) array 0.09 ms. `grouped` therefore applies a decomposition once per group of
matrices that share their size r and dtype: every matrix's leading axes are folded into one stack,
``(*batch, r, r) → (-1, r, r)``, the stacks are concatenated, decomposed in one call, and the
result is split and reshaped back. `grouped_factor_eighs` does this for the Gram matrices of many
adapted weights at once (their b-Grams and a-Grams in the same call).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def mm(x, y):
    """Batched matmul at full precision (no TF32/bf16 passes for the small algebra)."""
    return jnp.matmul(x, y, precision=HIGHEST)


def mT(x):
    return jnp.swapaxes(x, -1, -2)


def node_matrices(a, b, roles: str):
    """Reshape a node's factors to matrix form: a (*batch, I, r), b (*batch, r, O)."""
    n_in = roles.count("i")
    nb = a.ndim - 1 - n_in
    batch = a.shape[:nb]
    r = a.shape[-1]
    I = math.prod(a.shape[nb:-1])
    O = math.prod(b.shape[nb + 1:])
    return a.reshape(batch + (I, r)), b.reshape(batch + (r, O))


class Eig(NamedTuple):
    """Eigendecomposition of a PSD Gram matrix, G = vec · diag(lam) · vecᵀ.

    lam: eigenvalues with numerically-null ones set to exactly 0; inv: their damped pseudo-inverse
    (0 on null directions); vec: orthonormal eigenvectors (columns).
    """

    lam: jax.Array
    inv: jax.Array
    vec: jax.Array


def default_rcond(r: int, dtype) -> float:
    return 10.0 * r * float(jnp.finfo(dtype).eps)


def gram_eigh(g, *, damping: float, rcond: float | None = None) -> Eig:
    """`Eig` of the symmetric PSD matrix `g` (..., r, r)."""
    r = g.shape[-1]
    rcond = default_rcond(r, g.dtype) if rcond is None else rcond
    lam, vec = jnp.linalg.eigh(0.5 * (g + mT(g)))
    lam = jnp.maximum(lam, 0.0)
    keep = lam > rcond * jnp.max(lam, axis=-1, keepdims=True)
    lam = jnp.where(keep, lam, 0.0)
    inv = jnp.where(keep, 1.0 / (lam + damping), 0.0)
    return Eig(lam, inv, vec)


def factor_eighs(a, b, *, damping: float, rcond: float | None = None):
    """(eig of BᵀB = b bᵀ, eig of AAᵀ = aᵀ a) for matrix-form factors."""
    return (gram_eigh(mm(b, mT(b)), damping=damping, rcond=rcond),
            gram_eigh(mm(mT(a), a), damping=damping, rcond=rcond))


def grouped(mats, decompose):
    """``[decompose(m) for m in mats]``, with one `decompose` call per group of same (r, dtype).

    mats: a sequence of (*batch_k, r_k, r_k) arrays. `decompose` maps an (N, r, r) stack to a pytree
    of arrays with leading axis N (e.g. an `Eig` or `jnp.linalg.eigh`'s result) and must act on
    each of the N matrices independently. Returns, for each input, its part of the result with the
    leading axis reshaped back to ``batch_k``.
    """
    groups: dict = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[-1], jnp.dtype(m.dtype)), []).append(i)
    out = [None] * len(mats)
    for idx in groups.values():
        flat = [mats[i].reshape((-1,) + mats[i].shape[-2:]) for i in idx]
        res = decompose(flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0))
        start = 0
        for i, f in zip(idx, flat):
            n, batch = f.shape[0], mats[i].shape[:-2]

            def part(x, start=start, n=n, batch=batch):
                return x[start:start + n].reshape(batch + x.shape[1:])

            out[i] = jax.tree.map(part, res)
            start += n
    return out


def grouped_factor_eighs(factors, decompose):
    """``[(decompose(b bᵀ), decompose(aᵀa)) for a, b in factors]`` for matrix-form factor pairs,
    with one `decompose` call per (r, dtype) group: the b-Grams and a-Grams of every pair go into
    the same stacked call. The Gram products themselves are per pair (they touch the I×r and r×O
    factors). With ``decompose = partial(gram_eigh, damping=δ)`` each entry equals
    ``factor_eighs(a, b, damping=δ)``."""
    grams = []
    for a, b in factors:
        grams += [mm(b, mT(b)), mm(mT(a), a)]
    eigs = grouped(grams, decompose)
    return list(zip(eigs[0::2], eigs[1::2]))


def pinv_from_eig(e: Eig):
    """The damped pseudo-inverse ``vec · diag(inv) · vecᵀ``."""
    return mm(e.vec * e.inv[..., None, :], mT(e.vec))


def sylvester_in_eigenbasis(ct, eb: Eig, ea: Eig):
    """Y with (λ_i + μ_j) Y_ij = ct_ij, i.e. the Sylvester solve in the eigenbases.

    For P = U diag(λ) Uᵀ and Q = V diag(μ) Vᵀ, the solution of ``P X + X Q = C`` is
    ``X = U Y Vᵀ`` with ``ct = Uᵀ C V``. Pairs with λ_i + μ_j = 0 (both directions null) give 0
    (the minimum-norm solution).
    """
    den = eb.lam[..., :, None] + ea.lam[..., None, :]
    return jnp.where(den > 0, ct / jnp.where(den > 0, den, 1.0), 0.0)


def solve_sylvester_psd(p, q, c, *, damping: float = 0.0, rcond: float | None = None):
    """Solve ``P X + X Q = C`` for symmetric PSD P, Q (..., r, r) with two `eigh` calls."""
    ep = gram_eigh(p, damping=damping, rcond=rcond)
    eq = gram_eigh(q, damping=damping, rcond=rcond)
    y = sylvester_in_eigenbasis(mm(mm(mT(ep.vec), c), eq.vec), ep, eq)
    return mm(mm(ep.vec, y), mT(eq.vec))
