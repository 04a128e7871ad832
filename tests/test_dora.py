"""DoRA (`apply(..., dora=True)`): ``w' = m ⊙ w_eff / ‖w_eff‖``, the norm over the input axes per
output unit and detached in the backward pass (PEFT's ``weight_norm.detach()``), run factored.

Oracles: the adapted weight in float64 NumPy; gradients and optimizer steps from `jax.grad` of the
dense float64 formula, with the norm under `stop_gradient` (written here, not the library's)."""

import dataclasses

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from helpers import merged_weight_np, rel_err

KEY = jax.random.key(0)


def randomize(tree, key=jax.random.key(3), std=0.3):
    """Random a, b and m (b = 0 and m = ‖w‖ at init would hide terms)."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lora_jax.is_lora)
    out = []
    for i, n in enumerate(leaves):
        if lora_jax.is_lora(n):
            ka, kb, km = jax.random.split(jax.random.fold_in(key, i), 3)
            n = dataclasses.replace(
                n, a=std * jax.random.normal(ka, n.a.shape, n.a.dtype),
                b=std * jax.random.normal(kb, n.b.shape, n.b.dtype),
                m=n.m * jax.random.uniform(km, n.m.shape, n.m.dtype, 0.5, 1.5))
        out.append(n)
    return jax.tree.unflatten(treedef, out)


def ins_of(n):
    nb = n.num_batch_axes
    return tuple(nb + k for k, role in enumerate(n.roles) if role == "i")


def dora_weight_np(n) -> np.ndarray:
    """The oracle: ``m ⊙ W / ‖W‖`` with ``W = w + s·a@b``, in float64 NumPy."""
    w_eff = merged_weight_np(n)
    norm = np.sqrt(np.sum(w_eff ** 2, axis=ins_of(n), keepdims=True))
    return np.expand_dims(np.asarray(n.m, np.float64), ins_of(n)) * w_eff / norm


def dora_weight_jnp(n, a, b, m):
    """The same in JAX (float64 under x64), with the norm detached: the gradient oracle."""
    from lora_jax.node import axis_letters
    w_spec, a_spec, b_spec = axis_letters(n.roles, n.num_batch_axes)
    w_eff = jnp.asarray(np.asarray(n.w, np.float64)) + n.scale * jnp.einsum(
        f"{a_spec},{b_spec}->{w_spec}", a, b)
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w_eff ** 2, axis=ins_of(n), keepdims=True)))
    return jnp.expand_dims(m, ins_of(n)) * w_eff / norm


def nodes_of(tree):
    return [n for n in jax.tree.leaves(tree, is_leaf=lora_jax.is_lora) if lora_jax.is_lora(n)]


def _f64(x):
    return jnp.asarray(x) if jnp.issubdtype(x.dtype, jnp.integer) else jnp.asarray(np.asarray(x, np.float64))


def reference(fn, tree, args, probe):
    """float64 output of `fn` on the oracle weights, and the (a, b, m) gradients of
    ``<fn(...), probe>`` through `dora_weight_jnp`."""
    with jax.enable_x64(True):
        leaves, treedef = jax.tree.flatten(tree, is_leaf=lora_jax.is_lora)
        idx = [i for i, n in enumerate(leaves) if lora_jax.is_lora(n)]
        abm = [tuple(_f64(getattr(leaves[i], k)) for k in "abm") for i in idx]
        args64 = [_f64(x) for x in args]

        def params(abm):
            out = [v if lora_jax.is_lora(v) else _f64(v) for v in leaves]
            for i, (a, b, m) in zip(idx, abm):
                out[i] = dora_weight_jnp(leaves[i], a, b, m)
            return jax.tree.unflatten(treedef, out)

        merged = params(abm)
        merged_leaves = jax.tree.leaves(merged)  # one leaf per entry of `leaves`
        for i in idx:  # the JAX oracle's weights are the NumPy oracle's
            assert rel_err(merged_leaves[i], dora_weight_np(leaves[i])) < 1e-12
        y = fn(merged, *args64)
        grads = jax.grad(lambda abm: jnp.vdot(fn(params(abm), *args64), _f64(probe)))(abm)
        return np.asarray(y), [tuple(np.asarray(g) for g in t) for t in grads]


def check(fn, tree, *args, rtol=1e-5):
    """`wrap(fn)` on a DoRA tree equals the float64 oracle: output, and (a, b, m) gradients;
    strict: every product runs factored."""
    wrapped = lora_jax.wrap(fn, strict=True)
    y = jax.jit(wrapped)(tree, *args)
    probe = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
    y_ref, g_ref = reference(fn, tree, args, probe)
    assert rel_err(y, y_ref) <= rtol
    # merge gives the oracle weight too (in w's dtype)
    for n, merged in zip(nodes_of(tree), nodes_of_merged(tree)):
        assert rel_err(merged, dora_weight_np(n)) <= (1e-6 if n.w.dtype == jnp.float32 else 4e-3)
    trainable, frozen = lora_jax.split(tree)
    g = jax.jit(jax.grad(lambda t: jnp.vdot(wrapped(lora_jax.combine(t, frozen), *args), probe)))(trainable)
    g_abm = [(n.a, n.b, n.m) for n in nodes_of(g)]
    assert rel_err(g_abm, g_ref) <= rtol, rel_err(g_abm, g_ref)
    return g


def nodes_of_merged(tree):
    leaves = jax.tree.leaves(tree, is_leaf=lora_jax.is_lora)
    merged = jax.tree.leaves(lora_jax.merge(tree))
    return [m for n, m in zip(leaves, merged) if lora_jax.is_lora(n)]


def linen(module, *inputs):
    params = module.init(KEY, *inputs)["params"]
    return params, lambda p, *xs: module.apply({"params": p}, *xs)


# ----------------------------------------------------------------------------- forward and gradients


def test_matmul_both_orientations():
    k = jax.random.split(KEY, 3)
    tree = randomize(lora_jax.apply({"k": jax.random.normal(k[0], (12, 7))}, 3, alpha=6.0, dora=True))
    check(lambda p, x: x @ p["k"], tree, jax.random.normal(k[1], (5, 12)))
    # x @ w'ᵀ (a tied-embedding `attend`): DoRA's scale falls on x's columns
    check(lambda p, x: x @ p["k"].T, tree, jax.random.normal(k[2], (5, 7)))


def test_mlp():
    x = jax.random.normal(KEY, (2, 5, 12))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6)(nn.tanh(nn.Dense(20)(x)))

    params, fn = linen(MLP(), x)
    tree = randomize(lora_jax.apply(params, 4, dora=True))
    assert tree["Dense_0"]["kernel"].m.shape == (6,) and tree["Dense_1"]["kernel"].m.shape == (20,)
    check(fn, tree, x)


def test_dense_general_multi_axis():
    x = jax.random.normal(KEY, (2, 5, 16))

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 8), axis=-1, name="split")(x)       # (16) -> (4, 8): "ioo"
            return nn.DenseGeneral(12, axis=(-2, -1), name="join")(h)   # (4, 8) -> (12): "iio"

    params, fn = linen(M(), x)
    tree = randomize(lora_jax.apply(params, 3, dora=True, layout={"split/": "ioo", "join/": "iio"}))
    assert tree["split"]["kernel"].m.shape == (4, 8) and tree["join"]["kernel"].m.shape == (12,)
    check(fn, tree, x)


def test_scan_stacked_kernels():
    x = jax.random.normal(KEY, (2, 5, 8))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return h + nn.tanh(nn.Dense(8)(h)), None

    Stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Stack()(x, None)[0]

    params, fn = linen(M(), x)
    tree = randomize(lora_jax.apply(params, 2, dora=True, layout=lora_jax.layout_of(fn, params, x)))
    node, = nodes_of(tree)
    assert node.num_batch_axes == 1 and node.w.shape == (3, 8, 8) and node.m.shape == (3, 8)
    check(fn, tree, x)


def test_stacked_kernel_as_batched_dot():
    """A stacked kernel used whole, as a dot_general batch axis (vmap over layers), not sliced."""
    k = jax.random.split(KEY, 2)
    tree = randomize(lora_jax.apply({"k": jax.random.normal(k[0], (3, 6, 5))}, 2, dora=True,
                                    layout={"k": "io"}))
    check(lambda p, x: jnp.einsum("lti,lio->lto", x, p["k"]), tree, jax.random.normal(k[1], (3, 4, 6)))


def test_conv():
    x = jax.random.normal(KEY, (2, 6, 6, 3))
    params, fn = linen(nn.Conv(5, (3, 3)), x)
    tree = randomize(lora_jax.apply(params, 2, dora=True, layout={"kernel": "iiio"}))
    assert tree["kernel"].m.shape == (5,)
    check(fn, tree, x)


def test_embedding_lookup():
    """Rows of a DoRA table (roles "io"): the norm per column over the rows, as PEFT's DoRA embedding."""
    tree = randomize(lora_jax.apply({"embed": jax.random.normal(KEY, (10, 4))}, 2, dora=True,
                                    targets="embed"))
    check(lambda p, ids: p["embed"][ids], tree, jnp.array([[1, 3, 3], [9, 0, 2]]))


def test_bf16_kernel():
    k = jax.random.split(KEY, 2)
    w = jax.random.normal(k[0], (12, 7)).astype(jnp.bfloat16)
    tree = lora_jax.apply({"k": w}, 3, dora=True)
    assert tree["k"].m.dtype == jnp.float32
    np.testing.assert_allclose(tree["k"].m, np.linalg.norm(np.asarray(w, np.float64), axis=0), rtol=1e-6)
    tree = randomize(tree)
    check(lambda p, x: x @ p["k"].astype(jnp.float32), tree, jax.random.normal(k[1], (5, 12)))
    merged = lora_jax.merge(tree)["k"]
    assert merged.dtype == jnp.bfloat16
    assert rel_err(merged, dora_weight_np(tree["k"])) < 1e-2


# ----------------------------------------------------------------------------- init, tree operations


def test_init_equals_base_model_and_m_is_the_column_norm():
    x = jax.random.normal(KEY, (2, 5, 16))

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(12, axis=(-2, -1))(nn.DenseGeneral((4, 8))(x))

    params, fn = linen(M(), x)
    tree = lora_jax.apply(params, 3, dora=True, layout=lora_jax.layout_of(fn, params, x))
    for n, w in zip(nodes_of(tree), [params["DenseGeneral_0"]["kernel"], params["DenseGeneral_1"]["kernel"]]):
        norm = np.sqrt(np.sum(np.asarray(w, np.float64) ** 2, axis=ins_of(n)))
        np.testing.assert_allclose(n.m, norm, rtol=1e-6)
    np.testing.assert_allclose(lora_jax.wrap(fn)(tree, x), fn(params, x), rtol=1e-5, atol=1e-6)
    # plain LoRA nodes have no m, and flatten to the same leaves as before
    plain = nodes_of(lora_jax.apply(params, 3, layout=lora_jax.layout_of(fn, params, x)))[0]
    assert plain.m is None and len(jax.tree.leaves(plain)) == 3


def test_quantized_kernel_magnitude_from_the_dequantized_weight():
    w = jax.random.normal(KEY, (64, 8))
    tree = lora_jax.apply({"k": w}, 2, dora=True, quantize="q8_0")
    deq = np.asarray(tree["k"].w.dequantize(), np.float64)
    np.testing.assert_allclose(tree["k"].m, np.linalg.norm(deq, axis=0), rtol=1e-6)
    x = jax.random.normal(KEY, (3, 64))
    np.testing.assert_allclose(lora_jax.wrap(lambda p, x: x @ p["k"])(tree, x), x @ deq, rtol=1e-4, atol=1e-4)


def test_split_combine_round_trip():
    tree = randomize(lora_jax.apply({"k": jax.random.normal(KEY, (6, 5)), "bias": jnp.ones(5)}, 2,
                                    dora=True))
    trainable, frozen = lora_jax.split(tree)
    assert trainable["k"].w is None and trainable["k"].m.shape == (5,)
    assert frozen["k"].m is None and frozen["k"].a is None
    back = lora_jax.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="magnitude"):
        bad = dataclasses.replace(tree["k"], m=jnp.ones(6))
        lora_jax.merge({"k": bad})


# ----------------------------------------------------------------------------- optimizers


def _setup():
    k = jax.random.split(KEY, 3)
    tree = randomize(lora_jax.apply({"k": jax.random.normal(k[0], (10, 6))}, 3, alpha=6.0, dora=True))
    x, target = jax.random.normal(k[1], (8, 10)), jax.random.normal(k[2], (8, 6))
    trainable, frozen = lora_jax.split(tree)
    loss = lambda t: jnp.mean((lora_jax.wrap(lambda p: x @ p["k"])(lora_jax.combine(t, frozen)) - target) ** 2)
    return tree, trainable, jax.grad(loss)(trainable), (x, target)


def test_adamw_step_matches_oracle():
    tree, trainable, grads, (x, target) = _setup()
    n = tree["k"]
    with jax.enable_x64(True):
        abm = tuple(_f64(getattr(n, k)) for k in "abm")
        g_ref = jax.grad(lambda abm: jnp.mean((_f64(x) @ dora_weight_jnp(n, *abm) - _f64(target)) ** 2))(abm)
        g_ref = [np.asarray(g) for g in g_ref]
    assert rel_err([grads["k"].a, grads["k"].b, grads["k"].m], g_ref) < 1e-5
    lr, wd, eps = 1e-2, 0.1, 1e-8
    tx = optax.adamw(lr, weight_decay=wd, eps=eps)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    for key, g in zip("abm", g_ref):  # Adam's first step: m̂ = g, v̂ = g²
        p = np.asarray(getattr(n, key), np.float64)
        expect = -lr * (g / (np.abs(g) + eps) + wd * p)
        np.testing.assert_allclose(getattr(updates["k"], key), expect, rtol=1e-4, atol=1e-7)


def _without_m(tree):
    return jax.tree.map(lambda n: dataclasses.replace(n, m=None) if lora_jax.is_lora(n) else n,
                        tree, is_leaf=lora_jax.is_lora)


@pytest.mark.parametrize("name", ["lora_pro", "riemannian"])
def test_stateless_transforms_pass_m_through(name):
    _, trainable, grads, _ = _setup()
    tx = getattr(lora_jax, name)()
    out, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_array_equal(out["k"].m, grads["k"].m)
    plain, _ = tx.update(_without_m(grads), tx.init(_without_m(trainable)), _without_m(trainable))
    np.testing.assert_array_equal(out["k"].a, plain["k"].a)
    np.testing.assert_array_equal(out["k"].b, plain["k"].b)
    assert not np.allclose(out["k"].a, grads["k"].a)
    # efficient LoRA-Pro: m gets optax.adamw's own update
    chain = optax.chain(lora_jax.lora_pro(), optax.adamw(1e-2))
    up, _ = chain.update(grads, chain.init(trainable), trainable)
    ref, _ = optax.adamw(1e-2).update(grads["k"].m, optax.adamw(1e-2).init(trainable["k"].m),
                                      trainable["k"].m)
    np.testing.assert_allclose(up["k"].m, ref, rtol=1e-6)


def test_lora_pro_adamw_gives_m_plain_adamw():
    _, trainable, grads, _ = _setup()
    tx = lora_jax.lora_pro_adamw(1e-2, weight_decay=0.1)
    state = tx.init(trainable)
    up, state = tx.update(grads, state, trainable)
    up, state = tx.update(grads, state, trainable)  # a second step: the moments matter
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    s = adamw.init(trainable["k"].m)
    for _ in range(2):
        ref, s = adamw.update(grads["k"].m, s, trainable["k"].m)
    np.testing.assert_allclose(up["k"].m, ref, rtol=1e-6)
    plain_tx = lora_jax.lora_pro_adamw(1e-2, weight_decay=0.1)
    p_state = plain_tx.init(_without_m(trainable))
    for _ in range(2):
        plain, p_state = plain_tx.update(_without_m(grads), p_state, _without_m(trainable))
    np.testing.assert_allclose(up["k"].a, plain["k"].a, rtol=1e-6)
    np.testing.assert_allclose(up["k"].b, plain["k"].b, rtol=1e-6)
    with pytest.raises(ValueError, match="magnitude"):
        tx.update(_without_m(grads), state, trainable)


# ----------------------------------------------------------------------------- structure


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for out in eqn.outvars:
            yield eqn.primitive.name, tuple(getattr(out.aval, "shape", ()))
        for v in eqn.params.values():
            for item in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(item, (jex.ClosedJaxpr, jex.Jaxpr)):
                    yield from _shapes(getattr(item, "jaxpr", item))


def test_train_step_forms_no_kernel_sized_value():
    x = jax.random.normal(KEY, (5, 12))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(7)(nn.tanh(nn.Dense(20)(x)))

    params, fn = linen(MLP(), x)
    trainable, frozen = lora_jax.split(randomize(lora_jax.apply(params, 2, dora=True)))
    kernels = {(12, 20), (20, 7)}
    step = jax.grad(lambda t: jnp.sum(lora_jax.wrap(fn)(lora_jax.combine(t, frozen), x) ** 2))
    hits = [(p, s) for p, s in _shapes(jax.make_jaxpr(step)(trainable).jaxpr) if s in kernels]
    assert not hits, hits
    g = step(trainable)
    assert all(np.shape(v) not in kernels for v in jax.tree.leaves(g))
    assert {np.shape(v) for v in jax.tree.leaves(g)} >= {(20,), (7,)}  # the m gradients
    # the check sees a materialising step
    merged = jax.grad(lambda t: jnp.sum(fn(lora_jax.merge(lora_jax.combine(t, frozen)), x) ** 2))
    assert [s for _, s in _shapes(jax.make_jaxpr(merged)(trainable).jaxpr) if s in kernels]
