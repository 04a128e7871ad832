"""LoRA+ and the Riemannian preconditioner against float64 NumPy oracles (paper orientation)."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax.node import LoRA


def node(a, b, s=2.0, roles="io", dtype=jnp.float32):
    return LoRA(w=None, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), scale=s, roles=roles)


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


def problem(rng, batch, I, O, r, s=2.0):
    a = rng.normal(size=batch + (I, r)) / math.sqrt(I)
    b = rng.normal(size=batch + (r, O)) / math.sqrt(O)
    gK = rng.normal(size=batch + (I, O))
    return a, b, s * gK @ np.swapaxes(b, -1, -2), s * np.swapaxes(a, -1, -2) @ gK


# ------------------------------------------------------------------------------------------------
# Riemannian: gA ← (BᵀB + λI)⁻¹ gA, gB ← gB (AAᵀ + λI)⁻¹  (paper orientation, as PEFT)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,I,O", [(1, 7, 5), (4, 20, 12), (16, 48, 40)])
@pytest.mark.parametrize("batch", [(), (2, 3)])
@pytest.mark.parametrize("reg", [1e-2, 1e-6])
def test_riemannian_matches_float64_oracle(r, I, O, batch, reg):
    rng = np.random.default_rng(r + I + len(batch))
    a, b, ga, gb = problem(rng, batch, I, O, r)
    params = {"k": node(a, b), "bias": jnp.ones(2)}
    grads = {"k": node(ga, gb), "bias": jnp.full(2, 3.0)}
    tx = lora_jax.riemannian(reg)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["bias"], grads["bias"])
    for idx in np.ndindex(*batch):
        A, B, gA, gB = a[idx].T, b[idx].T, ga[idx].T, gb[idx].T
        gA2 = np.linalg.solve(B.T @ B + reg * np.eye(r), gA)
        gB2 = gB @ np.linalg.inv(A @ A.T + reg * np.eye(r))
        assert rel(np.asarray(out["k"].a)[idx].T, gA2) <= 1e-4
        assert rel(np.asarray(out["k"].b)[idx].T, gB2) <= 1e-4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_riemannian_step_zero_and_rank_deficient_finite(dtype):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 4)); a[:, 2:] = 0.0         # rank 2 < r
    b = np.zeros((4, 9))                                  # step 0
    ga, gb = np.zeros((12, 4)), rng.normal(size=(4, 9))
    p, g = {"k": node(a, b, dtype=dtype)}, {"k": node(ga, gb, dtype=dtype)}
    for reg in (1e-2, 1e-8):
        out, _ = lora_jax.riemannian(reg).update(g, optax.EmptyState(), p)
        assert out["k"].a.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(out["k"].a.astype(jnp.float32))))
        assert bool(jnp.all(jnp.isfinite(out["k"].b.astype(jnp.float32))))


def test_riemannian_multi_axis_roles_and_errors():
    rng = np.random.default_rng(1)
    a, b, ga, gb = problem(rng, (2,), 10, 12, 3)
    p = {"q": node(a, b.reshape(2, 3, 3, 4), roles="ioo")}
    g = {"q": node(ga, gb.reshape(2, 3, 3, 4), roles="ioo")}
    out, _ = lora_jax.riemannian(1e-3).update(g, optax.EmptyState(), p)
    gA2 = np.linalg.solve(b[1] @ b[1].T + 1e-3 * np.eye(3), ga[1].T)
    assert rel(np.asarray(out["q"].a)[1].T, gA2) < 1e-4
    with pytest.raises(ValueError, match="needs the current parameters"):
        lora_jax.riemannian().update(g, optax.EmptyState())
    with pytest.raises(ValueError, match="reg must be positive"):
        lora_jax.riemannian(0.0)


# ------------------------------------------------------------------------------------------------
# LoRA+: b's learning rate is ratio × a's
# ------------------------------------------------------------------------------------------------

def test_loraplus_sgd_and_adamw_match_separate_learning_rates():
    rng = np.random.default_rng(2)
    a, b, ga, gb = problem(rng, (3,), 16, 10, 4)
    p = {"k": node(a, b), "head": jnp.ones(4)}
    g = {"k": node(ga, gb), "head": jnp.arange(4.0)}
    lr, ratio = 1e-2, 16.0
    tx = lora_jax.loraplus(optax.sgd(lr), ratio)
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(u["k"].a, -lr * ga, rtol=1e-6)
    np.testing.assert_allclose(u["k"].b, -lr * ratio * gb, rtol=1e-6)
    np.testing.assert_allclose(u["head"], -lr * np.arange(4.0), rtol=1e-6)

    # AdamW: a and other leaves as adamw(lr); b exactly as adamw(ratio·lr), decay included (PEFT)
    tx = lora_jax.loraplus(optax.adamw(lr, weight_decay=0.1), ratio)
    ref_a = optax.adamw(lr, weight_decay=0.1)
    ref_b = optax.adamw(lr * ratio, weight_decay=0.1)
    st, sa, sb = tx.init(p), ref_a.init(p), ref_b.init(p)
    for _ in range(3):
        u, st = tx.update(g, st, p)
        ua, sa = ref_a.update(g, sa, p)
        ub, sb = ref_b.update(g, sb, p)
        np.testing.assert_allclose(u["k"].a, ua["k"].a, rtol=1e-6)
        np.testing.assert_allclose(u["k"].b, ub["k"].b, rtol=1e-5)
        np.testing.assert_allclose(u["head"], ua["head"], rtol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        lora_jax.loraplus(optax.sgd(1.0), ratio=0.0)


def test_loraplus_composes_with_lora_pro_and_schedules():
    rng = np.random.default_rng(3)
    a, b, ga, gb = problem(rng, (), 16, 10, 4)
    p, g = {"k": node(a, b)}, {"k": node(ga, gb)}
    inner = optax.chain(lora_jax.lora_pro(), optax.sgd(0.1))
    u1, _ = inner.update(g, inner.init(p), p)
    tx = lora_jax.loraplus(optax.chain(lora_jax.lora_pro(), optax.sgd(0.1)), ratio=4.0)
    u2, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(u2["k"].a, u1["k"].a, rtol=1e-6)
    np.testing.assert_allclose(u2["k"].b, 4.0 * np.asarray(u1["k"].b), rtol=1e-6)
    sched = optax.linear_schedule(0.0, 1.0, 10)
    tx = lora_jax.loraplus(optax.inject_hyperparams(optax.adamw)(learning_rate=sched))
    st = tx.init(p)
    u, st = jax.jit(tx.update)(g, st, p)
    assert float(jnp.abs(u["k"].b).max()) == 0.0  # lr 0 at step 0
    u, st = jax.jit(tx.update)(g, st, p)
    assert float(jnp.abs(u["k"].b).max()) > 0.0


def test_riemannian_warns_once_without_lora():
    plain = {"w": jnp.ones((3, 3))}
    tx = optax.chain(lora_jax.riemannian(), optax.sgd(0.1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        st = tx.init(plain)
        tx.update(plain, st, plain)
    assert len([w for w in rec if "no LoRA node" in str(w.message)]) == 1
