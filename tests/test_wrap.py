"""`wrap` runs factored and equals the float64 merged path, on every kind of layer."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax
from support import transformer as T
from helpers import check_factored, randomize_adapters

KEY = jax.random.key(0)


def adapted(params, rank=4, **kw):
    return randomize_adapters(lora_jax.apply(params, rank=rank, **kw), jax.random.key(11))


def linen(module, *inputs):
    params = module.init(KEY, *inputs)["params"]
    return params, lambda p, *xs: module.apply({"params": p}, *xs)


def test_plain_matmul_matches_numpy_oracle_and_formula():
    k = jax.random.split(KEY, 3)
    params = {"k": jax.random.normal(k[0], (24, 10))}
    tree = adapted(params, rank=3, alpha=6.0)
    x = jax.random.normal(k[1], (5, 24))
    check_factored(lambda p, x: x @ p["k"], tree, x)
    # the gradients themselves, by hand: ga = s·xᵀ(g bᵀ), gb = s·(x a)ᵀ g
    node = tree["k"]
    g = np.asarray(jax.random.normal(k[2], (5, 10)), np.float64)
    x64, a, b = (np.asarray(v, np.float64) for v in (x, node.a, node.b))
    tr, fr = lora_jax.split(tree)
    grads = jax.grad(lambda t: jnp.vdot(lora_jax.wrap(lambda p: x @ p["k"])(lora_jax.combine(t, fr)),
                                        g.astype(np.float32)))(tr)["k"]
    np.testing.assert_allclose(grads.a, node.scale * x64.T @ (g @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads.b, node.scale * (x64 @ a).T @ g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_dim,out_dim,rank", [(16, 8, 1), (8, 32, 4), (33, 17, 8)])
def test_dense(in_dim, out_dim, rank):
    x = jax.random.normal(KEY, (3, 7, in_dim))
    params, fn = linen(nn.Dense(out_dim), x)
    check_factored(fn, adapted(params, rank=rank), x)


def test_dense_general_multi_axis_kernels():
    x = jax.random.normal(KEY, (2, 5, 16))

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 8), axis=-1, name="split")(x)       # (16) -> (4, 8)
            return nn.DenseGeneral(12, axis=(-2, -1), name="join")(h)   # (4, 8) -> (12)

    params, fn = linen(M(), x)
    tree = adapted(params, rank=3, layout={"split/": "ioo", "join/": "iio"})
    assert tree["split"]["kernel"].a.shape == (16, 3) and tree["split"]["kernel"].b.shape == (3, 4, 8)
    assert tree["join"]["kernel"].a.shape == (4, 8, 3) and tree["join"]["kernel"].b.shape == (3, 12)
    check_factored(fn, tree, x)


def test_attention_kernels_get_roles_from_layout_of():
    x = jax.random.normal(KEY, (2, 6, 32))
    params, fn = linen(nn.MultiHeadDotProductAttention(num_heads=4), x, x)
    tree = adapted(params, rank=4, layout=lora_jax.layout_of(fn, params, x, x))
    assert tree["query"]["kernel"].roles == "ioo" and tree["out"]["kernel"].roles == "iio"
    check_factored(fn, tree, x, x)


def test_einsum_with_interleaved_axes():
    x = jax.random.normal(KEY, (2, 5, 16))
    params, fn = linen(nn.Einsum((4, 16, 8), "btd,hdk->bthk"), x)  # kernel (heads, d, k): "oio"
    tree = adapted(params, rank=3, targets="kernel", layout={"kernel": "oio"})
    assert tree["kernel"].a.shape == (16, 3) and tree["kernel"].b.shape == (3, 4, 8)
    check_factored(fn, tree, x)


def test_conv2d():
    x = jax.random.normal(KEY, (2, 9, 9, 3))

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(6, (3, 3), strides=2, padding="SAME")(x)

    params, fn = linen(M(), x)
    tree = adapted(params, rank=2)
    node = tree["Conv_0"]["kernel"]
    assert node.roles == "iiio" and node.a.shape == (3, 3, 3, 2) and node.b.shape == (2, 6)
    check_factored(fn, tree, x)


def test_embedding_lookup_and_attend():
    ids = jax.random.randint(KEY, (3, 7), 0, 40)

    class M(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(40, 16)
            return emb.attend(nn.Dense(16)(emb(ids)))  # gather, then x @ Eᵀ (contracts the out axis)

    params, fn = linen(M(), ids)
    tree = adapted(params, rank=4, targets=["embedding", "kernel"])
    assert lora_jax.is_lora(tree["Embed_0"]["embedding"])
    check_factored(fn, tree, ids)


def test_embeddings_are_not_default_targets():
    params = {"Embed_0": {"embedding": jnp.ones((10, 4))}, "Dense_0": {"kernel": jnp.ones((4, 4))}}
    tree = lora_jax.apply(params, rank=2)
    assert not lora_jax.is_lora(tree["Embed_0"]["embedding"]) and lora_jax.is_lora(tree["Dense_0"]["kernel"])


SMALL = dict(layers=2, d_model=32, d_ff=64, heads=4, batch=2, seq=8)


@pytest.mark.parametrize("scan,remat", [(False, False), (True, False), (False, True), (True, True)])
def test_transformer_scan_and_remat(scan, remat):
    model, params, x, y = T.init(T.Config(scan=scan, remat=remat, **SMALL))
    tree = randomize_adapters(T.adapt(model, params, x, rank=4), jax.random.key(11))
    nodes = [n for n in jax.tree_util.tree_leaves(tree, is_leaf=lora_jax.is_lora) if lora_jax.is_lora(n)]
    assert len(nodes) == (6 if scan else 12)
    if scan:
        assert all(n.num_batch_axes == 1 and n.a.shape[0] == 2 for n in nodes)
    check_factored(lambda p, x: model.apply({"params": p}, x), tree, x)


def test_nnx_model_through_split_merge():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(12, 24, rngs=rngs)
            self.down = nnx.Linear(24, 5, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.gelu(self.up(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    tree = adapted(state, rank=3)
    x = jax.random.normal(KEY, (4, 12))
    check_factored(lambda st, x: nnx.merge(graphdef, st)(x), tree, x)


class _StatefulMLP(nnx.Module):
    """NNX layers that update their own state when called: batch statistics and an RNG counter."""

    def __init__(self, rngs):
        self.up = nnx.Linear(12, 24, rngs=rngs)
        self.bn = nnx.BatchNorm(24, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.down = nnx.Linear(24, 5, rngs=rngs)

    def __call__(self, x):
        return self.down(self.drop(self.bn(nnx.gelu(self.up(x)))))


def _stateful_call(graphdef):
    def call(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)
    return call


def test_nnx_model_updating_its_state_matches_the_merged_model():
    """NNX Variables are rebuilt inside the trace `fn` runs in, so layers may update them (this
    raised flax's TraceContextError when quax rebuilt the Variables outside that trace)."""
    graphdef, state = nnx.split(_StatefulMLP(nnx.Rngs(0, dropout=1)))
    tree = adapted(state, rank=3)
    x = jax.random.normal(KEY, (4, 12))
    call = _stateful_call(graphdef)
    y, new_state = jax.jit(lora_jax.wrap(call))(tree, x)
    y_ref, ref_state = jax.jit(call)(lora_jax.merge(tree), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    moved = dict(nnx.to_flat_state(new_state))
    ref = dict(nnx.to_flat_state(ref_state))
    for path in [("bn", "mean"), ("bn", "var"), ("drop", "rngs", "count")]:
        np.testing.assert_allclose(moved[path][...], ref[path][...], rtol=1e-5, atol=1e-7)
    assert not np.allclose(moved[("bn", "mean")][...], 0.0)  # the statistics did move
    assert lora_jax.is_lora(moved[("up", "kernel")].get_value())  # adapters come back factored


def test_nnx_through_wrap_when_taking_the_trace_leaves_none(monkeypatch):
    """jax >= 0.11 sets the current trace to ``None`` inside `take_current_trace` (older jax: the
    eval trace), and flax asserts a trace exists whenever it builds a Variable. quax maps over its
    inputs inside that block, so Variables must not be rebuilt there. Emulated here on any jax."""
    from lora_jax._compat import jax_core as core

    def take_to_none(self):
        self.prev = core.trace_ctx.trace
        core.trace_ctx.set_trace(None)
        return self.prev

    graphdef, state = nnx.split(_StatefulMLP(nnx.Rngs(0, dropout=1)))
    tree = adapted(state, rank=3)
    x = jnp.ones((4, 12))
    monkeypatch.setattr(core.TakeCurrentTraceContextManager, "__enter__", take_to_none)
    y, _ = jax.jit(lora_jax.wrap(_stateful_call(graphdef)))(tree, x)
    monkeypatch.undo()
    np.testing.assert_allclose(y, jax.jit(_stateful_call(graphdef))(lora_jax.merge(tree), x)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", [(1, 8), (1, 32), (1, 1, 16), (2, 1, 8)])
def test_unit_batch_axes(lead):
    """A batch of 1 (generation, one-example steps): XLA:CPU once miscompiled the rank-axis
    multiply-reduce for results with a unit axis (errors of order 1 under jit)."""
    x = jax.random.normal(KEY, lead + (24,))
    params, fn = linen(nn.Dense(64), x)
    check_factored(fn, adapted(params, rank=8), x)


def test_equinox_model():
    model = eqx.nn.MLP(10, 3, 16, depth=2, key=KEY)
    params, static = eqx.partition(model, eqx.is_array)
    tree = adapted(params, rank=2)
    x = jax.random.normal(KEY, (6, 10))
    check_factored(lambda p, x: jax.vmap(eqx.combine(p, static))(x), tree, x)


def test_bf16_weights_with_f32_adapters():
    x = jax.random.normal(KEY, (4, 32))
    params, fn = linen(nn.Dense(16, param_dtype=jnp.bfloat16, dtype=jnp.float32), x)
    tree = adapted(params, rank=4)
    node = tree["kernel"]
    assert node.w.dtype == jnp.bfloat16 and node.a.dtype == jnp.float32
    check_factored(fn, tree, x, rtol=1e-5, grad_rtol=1e-5)  # f32 compute: only w is rounded, as in the oracle
    merged = lora_jax.merge(tree)
    assert merged["kernel"].dtype == jnp.bfloat16


def test_strict_raises_and_default_warns_naming_the_primitive():
    tree = adapted({"k": jnp.ones((6, 4))}, rank=2)
    fn = lambda p: jnp.sin(p["k"])  # noqa: E731  (no factored rule for sin)
    with pytest.raises(lora_jax.LoRAMaterializationError, match="sin"):
        lora_jax.wrap(fn, strict=True)(tree)
    with pytest.warns(lora_jax.LoRAMaterializationWarning, match="sin"):
        y = lora_jax.wrap(fn)(tree)
    np.testing.assert_allclose(y, jnp.sin(lora_jax.merge(tree)["k"]), rtol=1e-6)


def test_dropout_only_touches_the_adapter_path():
    x = jax.random.normal(KEY, (64, 32))
    params, fn = linen(nn.Dense(32), x)
    tree = lora_jax.apply(params, rank=4, dropout=0.5)
    wrapped = lora_jax.wrap(fn)
    # b = 0 at init: dropout cannot change the output
    np.testing.assert_array_equal(wrapped(tree, x, lora_dropout_key=jax.random.key(1)), wrapped(tree, x))
    tree = randomize_adapters(tree, jax.random.key(2))
    plain = wrapped(tree, x)
    np.testing.assert_allclose(plain, fn(lora_jax.merge(tree), x), rtol=1e-5, atol=1e-5)
    d1 = wrapped(tree, x, lora_dropout_key=jax.random.key(1))
    d2 = wrapped(tree, x, lora_dropout_key=jax.random.key(2))
    assert not np.allclose(d1, plain) and not np.allclose(d1, d2)
    # the mean over many masks is the undropped adapter (inverted dropout)
    keys = jax.random.split(jax.random.key(3), 400)
    mean = jax.vmap(lambda k: wrapped(tree, x, lora_dropout_key=k))(keys).mean(0)
    base = fn({"kernel": tree["kernel"].w, "bias": tree["bias"]}, x)
    delta, delta_mean = plain - base, mean - base
    assert np.linalg.norm(delta_mean - delta) / np.linalg.norm(delta) < 0.1


def test_wrong_layout_materialises_with_a_hint():
    tree = adapted({"k": jnp.ones((4, 6, 5))}, rank=2, layout={"k": "io"})  # (batch 4, in 6, out 5)
    fn = lambda p, x: jnp.einsum("bi,ijo->bjo", x, p["k"])  # noqa: E731  contracts axis 0
    x = jnp.ones((3, 4))
    with pytest.raises(lora_jax.LoRAMaterializationError, match=r"contracts its axes \(0,\).*layout"):
        lora_jax.wrap(fn, strict=True)(tree, x)
    fixed = adapted({"k": jnp.ones((4, 6, 5))}, rank=2, layout={"k": "ioo"})
    check_factored(fn, fixed, x)


@pytest.mark.parametrize("lora_is_rhs", [True, False])
def test_gradient_with_respect_to_w_is_exact_when_asked(lora_is_rhs):
    """`w` gets no gradient in a LoRA step, but differentiating it anyway must not give zero."""
    k = jax.random.split(KEY, 3)
    tree = adapted({"k": jax.random.normal(k[0], (12, 7))}, rank=3)
    x = jax.random.normal(k[1], (5, 12) if lora_is_rhs else (7, 4))
    fn = (lambda p, x: x @ p["k"]) if lora_is_rhs else (lambda p, x: p["k"] @ x)
    g = jax.random.normal(k[2], (5, 7) if lora_is_rhs else (12, 4))
    node = tree["k"]

    def via_wrap(w):
        t = {"k": lora_jax.LoRA(w=w, a=node.a, b=node.b, scale=node.scale, roles=node.roles)}
        return jnp.vdot(lora_jax.wrap(fn)(t, x), g)

    got = jax.grad(via_wrap)(node.w)
    want = jax.grad(lambda w: jnp.vdot(fn({"k": w + node.scale * node.a @ node.b}, x), g))(node.w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
