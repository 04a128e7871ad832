"""`lora_ga_init` against float64 NumPy oracles of PEFT's `LoraLayer.lora_ga_init` and (variant
"paper") of the authors' one, written in their orientation (W = Kᵀ (out, in), A (r, in), B (out, r)),
plus start-at-base and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from helpers import rel_err

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def regression_problem(shape, seed, n=32):
    """A random linear layer K (in, out) and the gradient of ½·mean‖xK − y‖² at it (fresh random
    x, y), both float32, as float64 copies too (the oracle sees the very numbers the init sees)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((n, shape[0]))
    y = rng.standard_normal((n, shape[1]))
    g = (x.T @ (x @ k.astype(np.float64) - y) / n).astype(np.float32)
    return k, g


def peft_factors(k, g, r, lora_scale, direction, scale, gamma=16.0, idx=None):
    """PEFT's lora_ga_init in float64, its own orientation: returns A (r, in), B (out, r)."""
    w, grad = np.asarray(k, np.float64).T, np.asarray(g, np.float64).T  # (out, in)
    u, s, vh = np.linalg.svd(grad, full_matrices=False)
    u, s, vh = u[:, :2 * r], s[:2 * r], vh[:2 * r]
    if direction == "ArBr":
        a, b, s_b = vh[1:2 * r:2], u[:, 0:2 * r:2], s[0:2 * r:2]
    elif direction == "A2rBr":
        a, b, s_b = vh[r:2 * r], u[:, :r], s[:r]
    elif direction == "ArB2r":
        a, b, s_b = vh[:r], u[:, r:2 * r], s[r:2 * r]
    else:  # random: the same r indices of the first 2r for A and B
        a, b, s_b = vh[idx], u[:, idx], s[idx]
    b = b @ np.diag(s_b)
    if scale == "stable":
        b = b * w.shape[0] ** 0.25 / gamma ** 0.5
    elif scale == "weight_svd":
        top = np.linalg.svd(w, compute_uv=False)[0]
        if s_b[0] > 0:
            b = b * top / s_b[0]
    elif scale == "gd_scale":
        a, b = a / lora_scale, b / lora_scale
    return a, b


def random_indices(node_a, g, r):
    """The indices of the first 2r right singular vectors of PEFT's G_W (= left ones of our
    kernel gradient) that `a`'s columns are (up to sign): checks they are singular vectors."""
    p = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)[0][:, :2 * r]
    a = np.asarray(node_a, np.float64)
    overlap = np.abs(p.T @ (a / np.linalg.norm(a, axis=0)))  # (2r, r); gd_scale rescales a
    idx = overlap.argmax(axis=0)
    assert np.all(overlap.max(axis=0) > 0.999) and len(set(idx)) == r, overlap
    return idx


def check_against_oracle(a, b, w, k, g, r, lora_scale, direction, scale, tol=1e-5):
    """a (in, r), b (r, out), w (in, out) of one matrix against PEFT's formulas; each singular
    pair's sign is the solver's, so the oracle's vectors take the implementation's signs."""
    idx = random_indices(a, g, r) if direction == "random" else None
    big_a, big_b = peft_factors(k, g, r, lora_scale, direction, scale, idx=idx)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sign_a = np.sign(np.sum(a64 * big_a.T, axis=0))
    sign_b = np.sign(np.sum(b64 * big_b.T, axis=1))
    if direction == "random":  # same indices in A and B: the signs must agree
        np.testing.assert_array_equal(sign_a, sign_b)
    big_a, big_b = sign_a[:, None] * big_a, big_b * sign_b[None, :]
    w_new = np.asarray(k, np.float64).T - lora_scale * big_b @ big_a  # PEFT: W − scaling·B@A
    assert rel_err(a, big_a.T) <= tol, rel_err(a, big_a.T)
    assert rel_err(b, big_b.T) <= tol, rel_err(b, big_b.T)
    assert rel_err(w, w_new.T) <= tol, rel_err(w, w_new.T)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", [(12, 20), (20, 7)])  # in < out, in > out; r = 3 divides neither
def test_factors_and_offset_match_peft(shape, direction, scale):
    k, g = regression_problem(shape, seed=sum(shape))
    tree = lora_jax.lora_ga_init({"lin": {"kernel": jnp.asarray(k)}}, {"lin": {"kernel": jnp.asarray(g)}},
                                 rank=3, alpha=5.0, direction=direction, scale=scale)
    node = tree["lin"]["kernel"]
    assert node.a.shape == (shape[0], 3) and node.b.shape == (3, shape[1])
    assert node.scale == pytest.approx(5.0 / 3) and node.w.dtype == jnp.float32
    check_against_oracle(node.a, node.b, node.w, k, g, 3, node.scale, direction, scale)


def test_rslora_scale_enters_gd_scale_and_offset():
    k, g = regression_problem((12, 20), seed=3)
    tree = lora_jax.lora_ga_init({"kernel": jnp.asarray(k)}, {"kernel": jnp.asarray(g)}, rank=4,
                                 alpha=6.0, rslora=True, scale="gd_scale")
    node = tree["kernel"]
    assert node.scale == pytest.approx(3.0)  # alpha / sqrt(r)
    check_against_oracle(node.a, node.b, node.w, k, g, 4, 3.0, "ArB2r", "gd_scale")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(jnp.tanh(nn.Dense(16)(x)))


@pytest.mark.parametrize("scale", SCALES)
def test_adapted_model_starts_at_the_base_model(scale):
    model = MLP()
    kx, ky, kp = jax.random.split(jax.random.key(1), 3)
    x, y = jax.random.normal(kx, (8, 12)), jax.random.normal(ky, (8, 5))
    params = model.init(kp, x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)
    grads = jax.grad(lambda p: jnp.mean((fn(p, x) - y) ** 2))(params)
    adapted = lora_jax.lora_ga_init(params, grads, rank=2, alpha=4.0, scale=scale)
    nodes = [n for n in jax.tree.leaves(adapted, is_leaf=lora_jax.is_lora) if lora_jax.is_lora(n)]
    assert len(nodes) == 2 and all(np.any(n.b) and np.any(n.a) for n in nodes)
    assert not np.array_equal(adapted["Dense_0"]["kernel"].w, params["Dense_0"]["kernel"])
    x_new = jax.random.normal(jax.random.key(2), (4, 12))
    base, out = fn(params, x_new), lora_jax.wrap(fn)(adapted, x_new)
    assert rel_err(out, base) <= 1e-6, rel_err(out, base)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArB2r", "weight_svd"),
                                             ("random", "stable")])
def test_scan_stacked_kernel_is_one_svd_per_layer(direction, scale):
    layers = [regression_problem((10, 8), seed=20 + i) for i in range(3)]
    k = np.stack([kk for kk, _ in layers])
    g = np.stack([gg for _, gg in layers])
    tree = lora_jax.lora_ga_init({"stack": {"kernel": jnp.asarray(k)}}, {"stack": {"kernel": jnp.asarray(g)}},
                                 rank=3, alpha=3.0, layout={"stack": "io"}, direction=direction,
                                 scale=scale, key=jax.random.key(5))
    node = tree["stack"]["kernel"]
    assert node.a.shape == (3, 10, 3) and node.b.shape == (3, 3, 8) and node.num_batch_axes == 1
    for i, (kk, gg) in enumerate(layers):
        check_against_oracle(node.a[i], node.b[i], node.w[i], kk, gg, 3, node.scale, direction, scale)


def test_random_direction_draws_from_key():
    k, g = regression_problem((20, 16), seed=9)
    make = lambda key: lora_jax.lora_ga_init({"kernel": jnp.asarray(k)}, {"kernel": jnp.asarray(g)},
                                             rank=4, direction="random", key=key)["kernel"]
    one, again, other = make(jax.random.key(0)), make(jax.random.key(0)), make(jax.random.key(1))
    np.testing.assert_array_equal(one.a, again.a)
    assert sorted(random_indices(one.a, g, 4)) != sorted(random_indices(other.a, g, 4))


@pytest.mark.parametrize("roles,shape,perm", [("ioo", (6, 2, 5), (0, 1, 2)), ("oio", (2, 6, 5), (1, 0, 2))])
def test_multi_axis_kernel_uses_its_matrix_form(roles, shape, perm):
    rng = np.random.default_rng(4)
    k = rng.standard_normal(shape).astype(np.float32)
    k_m = np.transpose(k, perm).reshape(6, 10)  # (in, out axes in w's order)
    x = rng.standard_normal((32, 6))
    y = rng.standard_normal((32, 10))
    g_m = (x.T @ (x @ k_m.astype(np.float64) - y) / 32).astype(np.float32)
    g = np.transpose(g_m.reshape(tuple(shape[p] for p in perm)), np.argsort(perm))
    tree = lora_jax.lora_ga_init({"q": {"kernel": jnp.asarray(k)}}, {"q": {"kernel": jnp.asarray(g)}},
                                 rank=2, alpha=2.0, layout={"q/kernel": roles})
    node = tree["q"]["kernel"]
    assert node.roles == roles and node.a.shape == (6, 2) and node.b.shape == (2, 2, 5)
    w_m = np.transpose(np.asarray(node.w), perm).reshape(6, 10)
    check_against_oracle(node.a, np.asarray(node.b).reshape(2, 10), w_m, k_m, g_m, 2, node.scale,
                         "ArB2r", "stable")
    spec = {"ioo": "bi,ihd->bhd", "oio": "bi,hid->bhd"}[roles]
    fn = lambda p, x: jnp.einsum(spec, x, p["q"]["kernel"])
    xs = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    base, out = fn({"q": {"kernel": jnp.asarray(k)}}, xs), lora_jax.wrap(fn)(tree, xs)
    assert rel_err(out, base) <= 1e-6, rel_err(out, base)


def test_bfloat16_kernel_keeps_its_dtype_and_starts_near_the_base():
    k, g = regression_problem((12, 20), seed=5)
    w = jnp.asarray(k, jnp.bfloat16)
    node = lora_jax.lora_ga_init({"kernel": w}, {"kernel": jnp.asarray(g, jnp.bfloat16)}, rank=3)["kernel"]
    assert node.w.dtype == jnp.bfloat16 and node.a.dtype == node.b.dtype == jnp.float32
    assert rel_err(lora_jax.merge({"kernel": node})["kernel"], w) <= 1e-2


def small_tree():
    k = jax.random.split(jax.random.key(0), 2)
    params = {"body": {"kernel": jax.random.normal(k[0], (12, 9))},
              "head": {"kernel": jax.random.normal(k[1], (9, 5))}}
    return params, jax.tree.map(lambda v: 0.1 * v + 1.0, params)


def test_missing_gradient_is_an_error_naming_the_kernel():
    params, grads = small_tree()
    with pytest.raises(ValueError, match=r"no float gradient for 1 targeted kernel.*'head/kernel'"):
        lora_jax.lora_ga_init(params, {"body": grads["body"]}, rank=2)
    with pytest.raises(ValueError, match=r"head/kernel"):
        lora_jax.lora_ga_init(params, {**grads, "head": {"kernel": None}}, rank=2)
    # gradients for untargeted leaves are not needed, extra ones are ignored
    tree = lora_jax.lora_ga_init(params, {"body": grads["body"], "other": jnp.ones(3)}, rank=2,
                                 targets="body")
    assert lora_jax.is_lora(tree["body"]["kernel"]) and not lora_jax.is_lora(tree["head"]["kernel"])


def test_gradient_of_the_wrong_shape_is_an_error():
    params, grads = small_tree()
    grads["head"]["kernel"] = grads["head"]["kernel"].T  # PEFT's (out, in) orientation
    with pytest.raises(ValueError, match=r"wrong shape.*head/kernel: gradient \(5, 9\), kernel \(9, 5\)"):
        lora_jax.lora_ga_init(params, grads, rank=2)


def test_rank_needs_2r_singular_vectors():
    params, grads = small_tree()
    # a global rank is capped at min(in, out) // 2 (head: 5 // 2 = 2), with one warning
    with pytest.warns(UserWarning, match=r"min\(in, out\) // 2.*head/kernel \(9, 5\) -> r=2"):
        tree = lora_jax.lora_ga_init(params, grads, rank=3)
    assert tree["head"]["kernel"].rank == 2 and tree["body"]["kernel"].rank == 3
    # an explicit rank above it is an error, as is a kernel too small for any rank
    with pytest.raises(ValueError, match=r"rank 3 for 'head/kernel'.*\[1, 2\].*2r singular vectors"):
        lora_jax.lora_ga_init(params, grads, rank=2, rank_pattern={"head": 3})
    thin = {"kernel": jnp.ones((9, 1))}
    with pytest.raises(ValueError, match=r"\[1, 0\]"):
        lora_jax.lora_ga_init(thin, thin, rank=2)


def test_bad_options_are_errors():
    params, grads = small_tree()
    with pytest.raises(ValueError, match="direction"):
        lora_jax.lora_ga_init(params, grads, direction="BrAr")
    with pytest.raises(ValueError, match="scale"):
        lora_jax.lora_ga_init(params, grads, scale="gd")  # the authors' name; PEFT's is gd_scale
    with pytest.raises(ValueError, match="stable_gamma"):
        lora_jax.lora_ga_init(params, grads, stable_gamma=0)
    with pytest.raises(ValueError, match="lora_ga_init"):
        lora_jax.apply(params, init="lora-ga")


PAPER_SCALES = ("stable", "gd", "unit", "weightS")


def paper_factors(k, g, r, lora_scale, direction, scale, gamma=16.0, ia=None, ib=None):
    """The authors' lora_ga_init (Outsider565/LoRA-GA, the paper's formulas) in float64, their
    orientation: A (r, in) = rows of Vh, B (out, r) = columns of U, no singular values."""
    w, grad = np.asarray(k, np.float64).T, np.asarray(g, np.float64).T
    u, s, vh = np.linalg.svd(grad, full_matrices=False)
    ia, ib = {"ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)),
              "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
              "ArB2r": (np.arange(r), np.arange(r, 2 * r))}.get(direction, (ia, ib))
    a, b = vh[ia], u[:, ib]
    if scale == "gd":
        a, b = a / lora_scale, b / lora_scale
    elif scale == "stable":
        c = w.shape[0] ** 0.25 / gamma ** 0.5
        a, b = a * c, b * c
    elif scale == "weightS":
        c = np.sqrt(np.linalg.svd(w, compute_uv=False)[:r] / lora_scale).mean()
        a, b = a * c, b * c
    return a, b


@pytest.mark.parametrize("scale", PAPER_SCALES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", [(12, 20), (20, 7)])
def test_paper_variant_matches_the_authors_formulas(shape, direction, scale):
    """variant="paper": a, b and the offset w against a float64 oracle of the authors' code; b's
    rows are orthonormal up to the scale (no singular values in b); "random" draws disjoint index
    halves."""
    k, g = regression_problem(shape, seed=3 * sum(shape))
    r, alpha = 3, 5.0
    node = lora_jax.lora_ga_init({"lin": {"kernel": jnp.asarray(k)}}, {"lin": {"kernel": jnp.asarray(g)}},
                                 rank=r, alpha=alpha, direction=direction, scale=scale, variant="paper",
                                 key=jax.random.key(7))["lin"]["kernel"]
    s = alpha / r
    ia = ib = None
    if direction == "random":
        ia = random_indices(node.a, g, r)
        q = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)[2][:2 * r]  # rows: right vectors
        bn = np.asarray(node.b, np.float64)
        ib = np.abs(q @ (bn / np.linalg.norm(bn, axis=1, keepdims=True)).T).argmax(axis=0)
        assert set(ia).isdisjoint(ib) and len(set(ia) | set(ib)) == 2 * r
    big_a, big_b = paper_factors(k, g, r, s, direction, scale, ia=ia, ib=ib)
    a64, b64 = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    big_a = np.sign(np.sum(a64 * big_a.T, axis=0))[:, None] * big_a
    big_b = big_b * np.sign(np.sum(b64 * big_b.T, axis=1))[None, :]
    assert rel_err(node.a, big_a.T) <= 1e-5 and rel_err(node.b, big_b.T) <= 1e-5
    assert rel_err(node.w, (np.asarray(k, np.float64).T - s * big_b @ big_a).T) <= 1e-5
    gram = b64 @ b64.T
    np.testing.assert_allclose(gram, gram[0, 0] * np.eye(r), atol=1e-5 * gram[0, 0])


def test_variant_and_its_scale_names_are_checked():
    k, g = regression_problem((8, 6), seed=1)
    p, gr = {"lin": {"kernel": jnp.asarray(k)}}, {"lin": {"kernel": jnp.asarray(g)}}
    with pytest.raises(ValueError, match="unknown LoRA-GA variant 'authors'"):
        lora_jax.lora_ga_init(p, gr, rank=2, variant="authors")
    with pytest.raises(ValueError, match="scale 'gd_scale' for variant 'paper'"):
        lora_jax.lora_ga_init(p, gr, rank=2, variant="paper", scale="gd_scale")
    with pytest.raises(ValueError, match="scale 'weightS' for variant 'peft'"):
        lora_jax.lora_ga_init(p, gr, rank=2, scale="weightS")
