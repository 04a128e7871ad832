"""LoRA-Pro against float64 NumPy/SciPy oracles written in the paper's orientation (W = W0 + s·B A).

The oracles below use A = aᵀ, B = bᵀ, g = (∂L/∂K)ᵀ and exact inverses / `scipy.linalg.solve_sylvester`;
the code under test works in kernel orientation with eigh-based pseudo-inverses, so agreement checks
the orientation bookkeeping as well as the algebra.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg as sl
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax
from helpers import lora_pro_state
from lora_jax import gram
from lora_jax.projection import adjust_matrices, equivalent_kernel_gradient, sylvester_x
from lora_jax.node import LoRA


# ------------------------------------------------------------------------------------------------
# float64 oracles (paper orientation)
# ------------------------------------------------------------------------------------------------

def oracle_x(A, B, gA, gB, s, mode):
    BtB, AAt = B.T @ B, A @ A.T
    Bi = np.linalg.inv(BtB)
    if mode == "zero":
        return np.zeros_like(BtB)
    if mode == "sylvester":
        return sl.solve_sylvester(BtB, AAt, -(1 / s**2) * Bi @ gA @ A.T)
    if mode == "symmetric":
        return -0.5 / s**2 * Bi @ B.T @ gB @ np.linalg.inv(AAt)
    raise ValueError(mode)


def oracle_adjust(A, B, gA, gB, s, X):
    m = B.shape[0]
    Bi, Ai = np.linalg.inv(B.T @ B), np.linalg.inv(A @ A.T)
    gA2 = (1 / s**2) * Bi @ gA + X @ A
    gB2 = (1 / s**2) * (np.eye(m) - B @ Bi @ B.T) @ gB @ Ai - B @ X
    return gA2, gB2


def projection(A, B, g):
    PB = B @ np.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ np.linalg.inv(A @ A.T) @ A
    return PB @ g + g @ PA - PB @ g @ PA


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


def random_problem(rng, batch, I, O, r, s):
    """Matrix-form a (…, I, r), b (…, r, O), consistent LoRA grads from a random full kernel grad."""
    a = rng.normal(size=batch + (I, r)) / math.sqrt(I) * 1.3
    b = rng.normal(size=batch + (r, O)) / math.sqrt(O) * 0.7
    gK = rng.normal(size=batch + (I, O))
    ga = s * gK @ np.swapaxes(b, -1, -2)
    gb = s * np.swapaxes(a, -1, -2) @ gK
    return a, b, ga, gb, gK


_JIT = {}


def _jitted_update(tx, key):
    """One jitted update per x choice (compiles once per shape; eager op-by-op is slower)."""
    if key not in _JIT:
        _JIT[key] = jax.jit(tx.update)
    return _JIT[key]


SHAPES = [(1, 7, 5), (4, 20, 12), (16, 48, 40), (4, 9, 30)]  # (r, I, O): in ≠ out


# ------------------------------------------------------------------------------------------------
# Theorem 2.1 through the optax transformation, on node-shaped (stacked, multi-axis) inputs
# ------------------------------------------------------------------------------------------------

def make_node(a_m, b_m, s, in_axes, out_axes, dtype=jnp.float32):
    """A trainable LoRA node (w=None) with roles 'i'*len(in)+'o'*len(out) and batch axes."""
    batch = a_m.shape[:-2]
    r = a_m.shape[-1]
    roles = "i" * len(in_axes) + "o" * len(out_axes)
    a = jnp.asarray(a_m.reshape(batch + tuple(in_axes) + (r,)), dtype)
    b = jnp.asarray(b_m.reshape(batch + (r,) + tuple(out_axes)), dtype)
    return LoRA(w=None, a=a, b=b, scale=s, roles=roles)


@pytest.mark.parametrize("r,I,O", SHAPES)
@pytest.mark.parametrize("batch", [(), (2, 3)])
@pytest.mark.parametrize("x", ["sylvester", "zero", "symmetric"])
def test_adjusted_gradients_match_float64_oracle(x, r, I, O, batch):
    rng = np.random.default_rng(1000 * r + I + 7 * len(batch))
    s = float(rng.uniform(0.3, 3.0))
    a, b, ga, gb, gK = random_problem(rng, batch, I, O, r, s)
    params = {"layer": make_node(a, b, s, (I,), (O,)), "head": jnp.ones(3)}
    grads = {"layer": make_node(ga, gb, s, (I,), (O,)), "head": jnp.arange(3.0)}
    tx = lora_jax.lora_pro(x=x)
    out, _ = _jitted_update(tx, x)(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["head"], grads["head"])  # untouched
    ga_out = np.asarray(out["layer"].a).reshape(a.shape)
    gb_out = np.asarray(out["layer"].b).reshape(b.shape)
    for idx in np.ndindex(*batch):
        A, B, gA, gB = a[idx].T, b[idx].T, ga[idx].T, gb[idx].T
        X = oracle_x(A, B, gA, gB, s, x)
        gA2, gB2 = oracle_adjust(A, B, gA, gB, s, X)
        assert rel(ga_out[idx].T, gA2) <= 1e-4, (idx, rel(ga_out[idx].T, gA2))
        assert rel(gb_out[idx].T, gB2) <= 1e-4, (idx, rel(gb_out[idx].T, gB2))
        # and the equivalent gradient is the tangent-space projection of g (X-independent)
        geq = s * (B @ gA2 + gB2 @ A)
        g = gK[idx].T
        np.testing.assert_allclose(geq, projection(A, B, g), rtol=0, atol=1e-10 * np.abs(g).max())
        k_eq = equivalent_kernel_gradient(jnp.asarray(a[idx], jnp.float32), jnp.asarray(b[idx], jnp.float32),
                                          jnp.asarray(ga_out[idx]), jnp.asarray(gb_out[idx]), s)
        assert rel(np.asarray(k_eq).T, projection(A, B, g)) <= 1e-4


def test_multi_axis_roles_match_matrix_form():
    """A DenseGeneral-like kernel (L, d, heads, head_dim), roles 'ioo', stacked: same as its matrix."""
    rng = np.random.default_rng(3)
    L, d, h, hd, r, s = 2, 12, 3, 5, 4, 0.5
    a, b, ga, gb, _ = random_problem(rng, (L,), d, h * hd, r, s)
    p = make_node(a, b, s, (d,), (h, hd))
    g = make_node(ga, gb, s, (d,), (h, hd))
    assert p.a.shape == (L, d, r) and p.b.shape == (L, r, h, hd)
    out, _ = lora_jax.lora_pro().update({"q": g}, optax.EmptyState(), {"q": p})
    ref = adjust_matrices(*(jnp.asarray(v, jnp.float32) for v in (a, b, ga, gb)), s)
    assert rel(np.asarray(out["q"].a).reshape(a.shape), ref[0]) < 1e-6
    assert rel(np.asarray(out["q"].b).reshape(b.shape), ref[1]) < 1e-6


# ------------------------------------------------------------------------------------------------
# The Sylvester solve: the intended equation, not its transpose
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,I,O", SHAPES)
def test_sylvester_residual_of_intended_equation(r, I, O):
    rng = np.random.default_rng(r * 31 + O)
    s = 1.7
    a, b, ga, _, _ = random_problem(rng, (2,), I, O, r, s)
    X = np.asarray(sylvester_x(*(jnp.asarray(v, jnp.float32) for v in (a, b, ga)), s), np.float64)
    for k in range(2):
        A, B, gA = a[k].T, b[k].T, ga[k].T
        BtB, AAt = B.T @ B, A @ A.T
        C = -(1 / s**2) * np.linalg.inv(BtB) @ gA @ A.T
        res = BtB @ X[k] + X[k] @ AAt - C
        assert np.linalg.norm(res) <= 1e-4 * np.linalg.norm(C)
        assert rel(X[k], sl.solve_sylvester(BtB, AAt, C)) <= 1e-4
        if r > 1:  # the transposed equation is a different one: the test can tell them apart
            res_t = AAt @ X[k] + X[k] @ BtB - C
            assert np.linalg.norm(res_t) > 1e-2 * np.linalg.norm(C)


def test_solve_sylvester_psd_matches_scipy():
    rng = np.random.default_rng(5)
    for r in (1, 4, 16):
        P = rng.normal(size=(3, r, r + 3)); P = P @ np.swapaxes(P, -1, -2)
        Q = rng.normal(size=(3, r, r + 5)); Q = Q @ np.swapaxes(Q, -1, -2)
        C = rng.normal(size=(3, r, r))
        X = gram.solve_sylvester_psd(*(jnp.asarray(v, jnp.float32) for v in (P, Q, C)))
        for k in range(3):
            assert rel(X[k], sl.solve_sylvester(P[k], Q[k], C[k])) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Properties (hypothesis): optimality of the Sylvester X, X-invariance, descent
# ------------------------------------------------------------------------------------------------

_adjust_jit = jax.jit(lambda a, b, ga, gb, s, x: adjust_matrices(a, b, ga, gb, s, x=x), static_argnums=5)
_objective_parts_jit = jax.jit(lambda a, b, ga, gb, s, X: adjust_matrices(a, b, ga, gb, s, x=X))
_equiv_jit = jax.jit(lambda a, b, ga, gb, s, x: equivalent_kernel_gradient(
    a, b, *adjust_matrices(a, b, ga, gb, s, x=x), s), static_argnums=5)


_objective_jit = jax.jit(lambda a, b, ga, gb, s, X: _objective_arr(a, b, ga, gb, s, X))


def _objective_arr(a, b, ga, gb, s, X):
    ga2, gb2 = adjust_matrices(a, b, ga, gb, s, x=X)
    return jnp.sum((ga2 - ga) ** 2) + jnp.sum((gb2 - gb) ** 2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), r=st.sampled_from([1, 4, 8]), eps=st.floats(1e-2, 1.0),
       s=st.floats(0.25, 4.0))
def test_perturbing_x_never_brings_gradients_closer(seed, r, eps, s):
    rng = np.random.default_rng(seed)
    I, O = r + 9, r + 5  # fixed per r so the jitted functions compile once; the data is fresh
    a, b, ga, gb, _ = (jnp.asarray(v, jnp.float32) for v in random_problem(rng, (), I, O, r, s))
    X = jax.jit(sylvester_x)(a, b, ga, s)
    base = float(_objective_jit(a, b, ga, gb, s, X))
    E = jnp.asarray(rng.normal(size=(r, r)), jnp.float32)
    E = eps * E * (float(jnp.linalg.norm(X)) + 1e-3) / float(jnp.linalg.norm(E))
    assert float(_objective_jit(a, b, ga, gb, s, X + E)) >= base * (1 - 1e-5) - 1e-7
    # and the named choice agrees with X passed explicitly
    ga_s, gb_s = _adjust_jit(a, b, ga, gb, s, "sylvester")
    ga_x, gb_x = _objective_parts_jit(a, b, ga, gb, s, X)
    assert rel(ga_s, ga_x) < 1e-4 and rel(gb_s, gb_x) < 1e-4


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), r=st.sampled_from([1, 3, 8]),
       x=st.sampled_from(["sylvester", "symmetric"]))
def test_equivalent_gradient_is_x_invariant_and_a_descent_direction(seed, r, x):
    rng = np.random.default_rng(seed)
    I, O, s = r + 6, r + 11, float(rng.uniform(0.3, 3))
    a, b, ga, gb, gK = (jnp.asarray(v, jnp.float32) for v in random_problem(rng, (), I, O, r, s))
    g0 = _equiv_jit(a, b, ga, gb, s, "zero")
    gx = _equiv_jit(a, b, ga, gb, s, x)
    assert rel(gx, g0) < 1e-4
    inner = float(jnp.sum(gK * gx))
    assert inner >= 0
    assert abs(inner - float(jnp.sum(gx * gx))) <= 1e-4 * float(jnp.sum(gK * gK))  # ⟨g, g̃⟩ = ‖g̃‖²


# ------------------------------------------------------------------------------------------------
# Step 0 (b = 0), rank deficiency, bf16, long runs
# ------------------------------------------------------------------------------------------------

def _toy(dtype_w, adapter_dtype, key=0, stacked=False):
    """A tiny regression problem; `stacked` uses a scan over a (3, 24, 24) stacked kernel."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    shape = (3, 24, 24) if stacked else (24, 16)
    params = {"dense": {"kernel": (jax.random.normal(k1, shape) / 5).astype(dtype_w)}}
    params = lora_jax.apply(params, rank=4, alpha=8, adapter_dtype=adapter_dtype,
                            layout={"kernel": "io"})  # (3, 24, 24) when stacked: layers, in, out
    x = jax.random.normal(k2, (32, 24)).astype(dtype_w)
    y = jax.random.normal(k3, (32, shape[-1]))

    def f(p, x):
        k = p["dense"]["kernel"]
        if stacked:
            return jax.lax.scan(lambda h, kk: (jnp.tanh(h @ kk), None), x, k)[0]
        return x @ k

    model = lora_jax.wrap(f)

    def loss(t, frozen):
        out = model(lora_jax.combine(t, frozen), x)
        return jnp.mean((out.astype(jnp.float32) - y) ** 2)

    trainable, frozen = lora_jax.split(params)
    return trainable, frozen, loss


@pytest.mark.parametrize("dtype_w,adapter_dtype", [(jnp.float32, jnp.float32),
                                                   (jnp.bfloat16, jnp.float32),
                                                   (jnp.bfloat16, jnp.bfloat16)])
@pytest.mark.parametrize("opt", ["sgd", "adamw", "full"])
def test_step_zero_is_finite(dtype_w, adapter_dtype, opt):
    t, frozen, loss = _toy(dtype_w, adapter_dtype)
    assert float(jnp.abs(t["dense"]["kernel"].b).max()) == 0.0
    tx = {"sgd": optax.chain(lora_jax.lora_pro(), optax.sgd(0.1)),
          "adamw": optax.chain(lora_jax.lora_pro(), optax.adam(1e-2)),
          "full": lora_jax.lora_pro_adamw(1e-2),
          "symmetric": optax.chain(lora_jax.lora_pro(x="symmetric"), optax.sgd(0.1))}[opt]
    g = jax.grad(loss)(t, frozen)
    upd, _ = jax.jit(tx.update)(g, tx.init(t), t)
    ua, ub = upd["dense"]["kernel"].a, upd["dense"]["kernel"].b
    assert ua.dtype == adapter_dtype and ub.dtype == adapter_dtype
    assert bool(jnp.all(jnp.isfinite(ua.astype(jnp.float32))))
    assert bool(jnp.all(jnp.isfinite(ub.astype(jnp.float32))))
    assert float(jnp.abs(ua.astype(jnp.float32)).max()) == 0.0  # gA' = 0 when B = 0
    assert float(jnp.abs(ub.astype(jnp.float32)).max()) > 0.0


def test_step_zero_b_gradient_is_the_limit():
    """At b = 0: gb' = (1/s²)(aᵀa)⁻¹ gb (paper: gB' = (1/s²) gB (AAᵀ)⁻¹)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 3)); gb = rng.normal(size=(3, 6)); s = 2.0
    z = np.zeros((3, 6)); zga = np.zeros((10, 3))
    for x in ("sylvester", "zero", "symmetric"):
        ga2, gb2 = adjust_matrices(*(jnp.asarray(v, jnp.float32) for v in (a, z, zga, gb)), s, x=x)
        assert float(jnp.abs(ga2).max()) == 0.0
        assert rel(gb2, np.linalg.inv(a.T @ a) @ gb / s**2) < 1e-5


@pytest.mark.parametrize("x", ["sylvester", "zero", "symmetric"])
def test_rank_deficient_factors_stay_finite_and_project(x):
    rng = np.random.default_rng(11)
    I, O, r, s = 16, 12, 6, 1.0
    a = rng.normal(size=(I, r))
    b = np.outer(rng.normal(size=r), rng.normal(size=O))  # rank 1 < r
    a[:, 3:] = a[:, :3] @ rng.normal(size=(3, 3))          # rank 3 < r
    gK = rng.normal(size=(I, O))
    ga, gb = s * gK @ b.T, s * a.T @ gK
    args = [jnp.asarray(v, jnp.float32) for v in (a, b, ga, gb)]
    ga2, gb2 = adjust_matrices(*args, s, x=x)
    assert bool(jnp.all(jnp.isfinite(ga2))) and bool(jnp.all(jnp.isfinite(gb2)))
    # the equivalent gradient is still the projection onto the (smaller) tangent space
    Ub = np.linalg.svd(b.T, full_matrices=False)[0][:, :1]
    Ua = np.linalg.svd(a, full_matrices=False)[0][:, :3]
    PB, PA = Ub @ Ub.T, Ua @ Ua.T
    g = gK.T
    target = PB @ g + g @ PA - PB @ g @ PA
    geq = np.asarray(equivalent_kernel_gradient(args[0], args[1], ga2, gb2, s)).T
    assert rel(geq, target) < 1e-3


@pytest.mark.parametrize("name", ["sgd", "adamw", "full"])
def test_1000_steps_no_nan(name):
    t, frozen, loss = _toy(jnp.bfloat16, jnp.float32, key=3)
    tx = {"sgd": optax.chain(lora_jax.lora_pro(), optax.sgd(0.05)),
          "adamw": optax.chain(lora_jax.lora_pro(), optax.adamw(1e-2)),
          "full": lora_jax.lora_pro_adamw(1e-2, weight_decay=0.01)}[name]

    def step(carry, _):
        t, st = carry
        l, g = jax.value_and_grad(loss)(t, frozen)
        u, st = tx.update(g, st, t)
        return (optax.apply_updates(t, u), st), l

    (t_end, _), losses = jax.jit(lambda t, s: jax.lax.scan(step, (t, s), None, length=1000))(t, tx.init(t))
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert np.all(np.isfinite(np.asarray(t_end["dense"]["kernel"].a)))
    assert np.all(np.isfinite(np.asarray(t_end["dense"]["kernel"].b)))
    assert losses[-1] < 0.9 * losses[0]


# ------------------------------------------------------------------------------------------------
# lora_pro_adamw against a float64 NumPy Algorithm 2
# ------------------------------------------------------------------------------------------------

def numpy_algorithm2(A, B, s, grads_fn, steps, lr, b1, b2, eps, wd):
    """Paper orientation, float64. grads_fn(A, B) -> (gA, gB). Returns A, B after `steps` steps."""
    m, n = B.shape[0], A.shape[1]
    M, V = np.zeros((m, n)), np.zeros((m, n))
    for t in range(1, steps + 1):
        gA, gB = grads_fn(A, B)
        Z = np.zeros((A.shape[0],) * 2)
        gA0, gB0 = oracle_adjust(A, B, gA, gB, s, Z)
        g = s * B @ gA0 + s * gB0 @ A
        M = b1 * M + (1 - b1) * g
        V = b2 * V + (1 - b2) * g * g
        U = (M / (1 - b1**t)) / (np.sqrt(V / (1 - b2**t)) + eps)
        gAU, gBU = s * B.T @ U, s * U @ A.T
        X = sl.solve_sylvester(B.T @ B, A @ A.T, -(1 / s**2) * np.linalg.inv(B.T @ B) @ gAU @ A.T)
        gA2, gB2 = oracle_adjust(A, B, gAU, gBU, s, X)
        f = math.sqrt(1 - lr * wd)
        A, B = f * A - lr * gA2, f * B - lr * gB2
    return A, B


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("steps,wd", [(1, 0.0), (3, 0.1)])
def test_lora_pro_adamw_matches_numpy_algorithm2(batch, steps, wd):
    rng = np.random.default_rng(42 + steps)
    I, O, r, s, lr = 18, 11, 4, 1.5, 0.01
    a, b, _, _, _ = random_problem(rng, batch, I, O, r, s)
    gKs = [rng.normal(size=batch + (I, O)) for _ in range(steps)]
    params = {"k": make_node(a, b, s, (I,), (O,))}
    tx = lora_jax.lora_pro_adamw(lr, weight_decay=wd)
    state = tx.init(params)
    for t in range(steps):
        p = params["k"]
        gK = jnp.asarray(gKs[t], jnp.float32)
        grads = {"k": LoRA(w=None, a=s * gK @ jnp.swapaxes(p.b, -1, -2), b=s * jnp.swapaxes(p.a, -1, -2) @ gK,
                           scale=s, roles="io")}
        upd, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, upd)
    for idx in np.ndindex(*batch):
        it = iter(range(steps))

        def grads_fn(A, B, idx=idx, it=it):
            g = gKs[next(it)][idx].T
            return s * B.T @ g, s * g @ A.T

        A_ref, B_ref = numpy_algorithm2(a[idx].T, b[idx].T, s, grads_fn, steps, lr, 0.9, 0.999, 1e-8, wd)
        a_out = np.asarray(params["k"].a)[idx]
        b_out = np.asarray(params["k"].b)[idx]
        assert rel(a_out.T - a[idx].T, A_ref - a[idx].T) <= 1e-4  # compare the *updates*, not the params
        assert rel(b_out.T - b[idx].T, B_ref - b[idx].T) <= 1e-4


def test_lora_pro_adamw_state_is_exactly_the_full_moments():
    rng = np.random.default_rng(0)
    L, I, O, r, s = 3, 40, 24, 4, 2.0
    a, b, _, _, _ = random_problem(rng, (L,), I, O, r, s)
    params = {"q": make_node(a, b, s, (I,), (6, 4)), "head": jnp.zeros((5,)), "frozen": None}
    tx = lora_jax.lora_pro_adamw(1e-3)
    state = tx.init(params)
    lp = lora_pro_state(state)  # the full-shape moments; the head's are optax.adamw's
    assert lp.mu["q"].shape == (L, I, O) and lp.nu["q"].shape == (L, I, O)
    assert lp.mu["frozen"] is None and not jax.tree_util.tree_leaves(lp.mu["head"])
    leaves = jax.tree_util.tree_leaves(state)
    counts = [x for x in leaves if x.size == 1]
    assert len(counts) == 2  # the LoRA part's and optax.adamw's
    assert sorted(x.size for x in leaves) == sorted([1, 1, L * I * O, L * I * O, 5, 5])
    mem = jax.jit(tx.init).lower(params).compile().memory_analysis()
    exact = 4 * (2 * L * I * O + 2 * 5 + 2)
    if mem is not None:  # XLA pads each small buffer; allow alignment slack, nothing more
        assert exact <= mem.output_size_in_bytes <= exact + 64 * len(leaves)
    # and the state is unchanged in structure by an update
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, st2 = tx.update(grads, state, params)
    assert jax.tree_util.tree_structure(st2) == jax.tree_util.tree_structure(state)


def test_lora_pro_adamw_schedules_chain_inject_hyperparams():
    t, frozen, loss = _toy(jnp.float32, jnp.float32, stacked=True)
    g = jax.grad(loss)(t, frozen)
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 50)
    for tx in (lora_jax.lora_pro_adamw(sched),
               optax.chain(optax.clip_by_global_norm(1.0), lora_jax.lora_pro_adamw(1e-2)),
               optax.inject_hyperparams(lora_jax.lora_pro_adamw)(learning_rate=1e-2, weight_decay=0.1),
               optax.chain(optax.clip_by_global_norm(1.0), lora_jax.lora_pro(), optax.adamw(1e-2))):
        st = tx.init(t)
        u, st = jax.jit(tx.update)(g, st, t)
        u, st = jax.jit(tx.update)(g, st, optax.apply_updates(t, u))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(u))
    # a schedule at 0 gives a zero update at step 0
    u, _ = lora_jax.lora_pro_adamw(sched).update(g, lora_jax.lora_pro_adamw(sched).init(t), t)
    assert float(jnp.abs(u["dense"]["kernel"].b).max()) == 0.0
    # inject_hyperparams: the learning rate is really read from the state
    tx = optax.inject_hyperparams(lora_jax.lora_pro_adamw)(learning_rate=1e-2)
    st = tx.init(t)
    u1, _ = tx.update(g, st, t)
    st.hyperparams["learning_rate"] = jnp.asarray(2e-2)
    u2, _ = tx.update(g, st, t)
    np.testing.assert_allclose(u2["dense"]["kernel"].b, 2 * u1["dense"]["kernel"].b, rtol=1e-5)


def test_sgd_mode_descends_exactly_like_projected_full_gradient():
    """chain(lora_pro(), sgd(lr)): the first-order change of K is −lr·s·(ga' b + a gb') = −lr·P(g)."""
    rng = np.random.default_rng(9)
    I, O, r, s, lr = 14, 9, 3, 0.8, 1e-3
    a, b, ga, gb, gK = random_problem(rng, (), I, O, r, s)
    p = {"k": make_node(a, b, s, (I,), (O,))}
    g = {"k": make_node(ga, gb, s, (I,), (O,))}
    tx = optax.chain(lora_jax.lora_pro(), optax.sgd(lr))
    u, _ = tx.update(g, tx.init(p), p)
    dK = s * (np.asarray(u["k"].a) @ b + a @ np.asarray(u["k"].b))
    assert rel(dK.T, -lr * projection(a.T, b.T, gK.T)) < 1e-4


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_clear_errors_and_warn_once():
    t, frozen, loss = _toy(jnp.float32, jnp.float32)
    g = jax.grad(loss)(t, frozen)
    for tx in (lora_jax.lora_pro(), lora_jax.lora_pro_adamw(1e-3), lora_jax.riemannian()):
        st = tx.init(t)
        with pytest.raises(ValueError, match="needs the current parameters"):
            tx.update(g, st)
        with pytest.raises(ValueError, match="different tree structures"):
            tx.update(g, st, lora_jax.combine(t, frozen) | {"extra": jnp.ones(2)})
        with pytest.raises(ValueError, match="a LoRA node in one of"):
            tx.update({"dense": {"kernel": jnp.ones((24, 16))}}, st, t)
        bad = LoRA(w=None, a=jnp.ones((24, 2)), b=jnp.ones((2, 16)), scale=1.0, roles="io")
        with pytest.raises(ValueError, match="shapes"):
            tx.update({"dense": {"kernel": bad}}, st, t)
    with pytest.raises(ValueError, match="x must be one of"):
        lora_jax.lora_pro(x="eig")

    plain = {"w": jnp.ones((3, 3))}
    tx = optax.chain(lora_jax.lora_pro(), optax.sgd(0.1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        st = tx.init(plain)
        tx.update(plain, st, plain)
        tx.update(plain, st, plain)
    msgs = [w for w in rec if "no LoRA node" in str(w.message)]
    assert len(msgs) == 1
