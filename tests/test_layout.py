"""`layout_of` reads axis roles from how a model uses its weights; `apply` then runs factored.

Each model: the roles `layout_of` finds, ``apply(params, layout=...)`` executed by
``wrap(fn, strict=True)`` (no materialisation), and `check_factored` against the float64 merged
model. Models whose kernels have 3+ axes also show that `apply` alone refuses to guess.
"""

import warnings

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
D = 32


def factored(fn, params, *args, rank=4):
    """layout_of → apply → strict wrap, then the float64 oracle. Returns the layout."""
    layout = lora_jax.layout_of(fn, params, *args)
    tree = randomize_adapters(lora_jax.apply(params, rank=rank, layout=layout), jax.random.key(5))
    jax.jit(lora_jax.wrap(fn, strict=True))(tree, *args)
    check_factored(fn, tree, *args)
    return layout


def linen(module, *inputs):
    params = module.init(KEY, *inputs)["params"]
    return params, lambda p, *xs: module.apply({"params": p}, *xs)


def refuses_to_guess(params, *paths):
    with pytest.raises(ValueError, match="layout_of") as err:
        lora_jax.apply(params, rank=4)
    for path in paths:
        assert path in str(err.value)


# ------------------------------------------------------------------------------------------------
# (i) nn.scan stack of blocks with plain nn.Dense query/key/value/out: kernels (L, d, d)


def test_linen_scan_stack_with_plain_dense_qkvo():
    cfg = T.Config(layers=3, d_model=D, d_ff=64, heads=4, batch=2, seq=8, scan=True, attention="dense")
    model, params, x, _ = T.init(cfg)
    assert params["layers"]["attn"]["query"]["kernel"].shape == (3, D, D)
    layout = factored(lambda p, x: model.apply({"params": p}, x), params, x)
    assert layout == {f"layers/{m}/kernel": "io" for m in
                      ("attn/query", "attn/key", "attn/value", "attn/out", "ffn_in", "ffn_out")}
    refuses_to_guess(params, "'layers/attn/query/kernel' (3, 32, 32)")


def test_linen_scan_of_multi_head_attention_with_remat():
    cfg = T.Config(layers=2, d_model=D, d_ff=64, heads=4, batch=2, seq=8, scan=True, remat=True)
    model, params, x, _ = T.init(cfg)
    layout = factored(lambda p, x: model.apply({"params": p}, x), params, x)
    assert layout["layers/attn/query/kernel"] == "ioo" and layout["layers/attn/out/kernel"] == "iio"
    assert layout["layers/ffn_in/kernel"] == "io"


# ------------------------------------------------------------------------------------------------
# (ii) NNX: layers stacked by nnx.vmap, run by nnx.scan, through nnx.split / nnx.merge


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(D, D, rngs=rngs)
        self.value = nnx.Linear(D, D, rngs=rngs)
        self.out = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.out(nnx.gelu(self.query(x)) * self.value(x))


class NNXStack(nnx.Module):
    def __init__(self, layers, rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)
        self.blocks = make(rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)
        return self.head(body(x, self.blocks))


def test_nnx_vmap_stacked_layers_run_by_nnx_scan():
    graphdef, state = nnx.split(NNXStack(3, nnx.Rngs(0)))
    x = jax.random.normal(KEY, (4, D))
    fn = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    with pytest.warns(UserWarning, match="exceeds"):  # rank 4 > the 3-class head: capped
        layout = factored(fn, state, x)
    assert layout == {"blocks/query/kernel": "io", "blocks/value/kernel": "io",
                      "blocks/out/kernel": "io", "head/kernel": "io"}
    refuses_to_guess(state, "'blocks/query/kernel' (3, 32, 32)")


# ------------------------------------------------------------------------------------------------
# (iii) GQA: DenseGeneral q (d, heads, hd), k/v (d, kv_heads, hd), out (heads, hd, d)


class GQA(nn.Module):
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 4

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)
        k = nn.DenseGeneral((self.kv_heads, self.head_dim), name="key")(x)
        v = nn.DenseGeneral((self.kv_heads, self.head_dim), name="value")(x)
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=-2), jnp.repeat(v, rep, axis=-2)
        h = nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(h)


def test_gqa_dense_general_kernels():
    x = jax.random.normal(KEY, (2, 6, D))
    params, fn = linen(GQA(), x)
    assert params["key"]["kernel"].shape == (D, 2, 4)  # kv_heads·head_dim ≠ d_model
    layout = factored(fn, params, x)
    assert layout == {"query/kernel": "ioo", "key/kernel": "ioo", "value/kernel": "ioo",
                      "out/kernel": "iio"}
    refuses_to_guess(params, "'key/kernel' (32, 2, 4)", "'out/kernel' (8, 4, 32)")


# ------------------------------------------------------------------------------------------------
# (iv) Gemma-style einsum weight (heads, d_model, head_dim)


class GemmaQ(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), (4, D, 8))
        q = jnp.einsum("BTD,NDH->BTNH", x, w)
        return jnp.einsum("BTNH,NHD->BTD", jnp.tanh(q), self.param("o", nn.initializers.normal(0.1),
                                                                     (4, 8, D)))


def test_gemma_style_einsum_weights():
    x = jax.random.normal(KEY, (2, 5, D))
    params, fn = linen(GemmaQ(), x)
    layout = factored(fn, params, x)
    assert layout == {"w": "oio", "o": "iio"}
    refuses_to_guess(params, "'w' (4, 32, 8)")


# ------------------------------------------------------------------------------------------------
# (v) conv and (vi) tied embedding


def test_conv():
    x = jax.random.normal(KEY, (2, 9, 9, 3))

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(6, (3, 3), strides=2, padding="SAME")(x)
            return nn.Conv(4, (2,), name="temporal")(h.reshape(2, -1, 6))

    params, fn = linen(M(), x)
    layout = factored(fn, params, x, rank=2)
    assert layout == {"Conv_0/kernel": "iiio", "temporal/kernel": "iio"}


def test_tied_embedding_gather_and_attend():
    ids = jax.random.randint(KEY, (3, 7), 0, 40)

    class M(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(40, 16, name="wte")
            return emb.attend(nn.Dense(16)(emb(ids)))  # rows gathered; x @ Eᵀ contracts the "o" axis

    params, fn = linen(M(), ids)
    layout = lora_jax.layout_of(fn, params, ids)
    assert layout == {"wte/embedding": "io", "Dense_0/kernel": "io"}
    tree = lora_jax.apply(params, rank=4, layout=layout, targets=["embedding", "kernel"])
    tree = randomize_adapters(tree, jax.random.key(5))
    jax.jit(lora_jax.wrap(fn, strict=True))(tree, ids)
    check_factored(fn, tree, ids)


# ------------------------------------------------------------------------------------------------
# what layout_of follows, and what it leaves out


def test_follows_calls_control_flow_and_slices():
    k = jax.random.split(KEY, 8)

    @jax.custom_vjp
    def mm(x, w):
        return x @ w
    mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    params = {"jit": jax.random.normal(k[0], (8, 6)),      # used in a jit, as (wᵀ @ xᵀ)ᵀ
              "remat": jax.random.normal(k[1], (8, 6)),     # transposed inside a checkpoint
              "cond": jax.random.normal(k[2], (8, 2, 4)),   # DenseGeneral-like in a cond branch
              "loop": jax.random.normal(k[3], (8, 8)),      # fori_loop body
              "vjp": jax.random.normal(k[4], (8, 8)),       # custom_vjp
              "stack": jax.random.normal(k[5], (3, 8, 8)),  # scanned over
              "index": jax.random.normal(k[6], (3, 8, 8)),  # w[i] in a scan body
              "cast": jax.random.normal(k[7], (8, 8)),      # cast, a unit axis added and removed
              "unit": jnp.ones((8, 1, 8)),                  # its own unit axis squeezed away
              "norm": jnp.ones((4, 8))}                      # no product: left out

    def fn(p, x):
        h = jax.jit(lambda w, x: (w.T @ x.T).T)(p["jit"], x)            # contracts axis 0
        h = jax.checkpoint(lambda h: h @ p["remat"].T)(h)                # contracts axis 1
        h = jax.lax.cond(h.sum() > 0, lambda h: jnp.einsum("bd,dnk->bnk", h, p["cond"]).reshape(h.shape),
                         lambda h: h, h)
        h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["loop"]), h)
        h = mm(h, p["vjp"])
        h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"])[0]
        h = jax.lax.scan(lambda h, i: (h @ p["index"][i], None), h, jnp.arange(3))[0]
        h = h @ jnp.squeeze(p["cast"].astype(jnp.bfloat16)[None], 0).astype(jnp.float32)
        h = h @ jnp.squeeze(p["unit"], 1)
        return h * p["norm"][0]

    x = jax.random.normal(KEY, (5, 8))
    with pytest.warns(UserWarning, match=r"'unit' \(8, 1, 8\): .*drops one of its axes"):
        layout = lora_jax.layout_of(fn, params, x)
    assert layout == {"jit": "io", "remat": "oi", "cond": "ioo", "loop": "io", "vjp": "io",
                      "stack": "io", "index": "io", "cast": "io"}, layout
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    with pytest.warns(UserWarning, match="'unit'"):
        assert lora_jax.layout_of(fn, abstract, x) == layout  # shapes suffice: nothing is computed


def test_disagreeing_uses_and_non_leading_batch_axes_are_left_out_with_a_warning():
    w = jnp.ones((4, 6, 5))
    params = {"twice": w, "mid_batch": w, "merged": w, "plain": jnp.ones((6, 5))}

    def fn(p, x, y, z):
        a = jnp.einsum("bi,ijk->bjk", x, p["twice"])      # reads (i, o, o)
        b = jnp.einsum("bj,ijk->bik", y, p["twice"])      # reads (o, i, o)
        c = jnp.einsum("jbi,jio->jbo", z, p["mid_batch"].transpose(1, 0, 2))  # batch is axis 1
        d = y @ p["merged"].reshape(24, 5)[:6]
        return a.sum() + b.sum() + c.sum() + d.sum() + (y @ p["plain"]).sum()

    x, y, z = jnp.ones((2, 4)), jnp.ones((2, 6)), jnp.ones((6, 2, 4))
    with pytest.warns(UserWarning) as rec:
        layout = lora_jax.layout_of(fn, params, x, y, z)
    assert layout == {"plain": "io"}
    msg = "\n".join(str(w.message) for w in rec)
    assert len(rec) == 1
    assert "'twice' (4, 6, 5): its uses disagree" in msg and "'ioo'" in msg and "'oio'" in msg
    assert "'mid_batch' (4, 6, 5)" in msg and "not leading" in msg
    assert "'merged' (4, 6, 5)" in msg and "mixes its axes" in msg


def test_layout_of_keys_are_exact_paths_for_apply():
    """Paths with regex characters, and paths that are prefixes of others, still select exactly."""
    params = {"h.0": {"kernel": jnp.ones((4, 3, 5))}, "hx0": {"kernel": jnp.ones((4, 3, 5))}}

    def fn(p, x):
        a = jax.lax.scan(lambda h, w: (h, x @ w), 0, p["h.0"]["kernel"])[1]  # stacked (L, in, out)
        b = jnp.einsum("bi,ijk->bjk", jnp.ones((2, 4)), p["hx0"]["kernel"])   # (in, out, out)
        return a.sum() + b.sum()

    layout = lora_jax.layout_of(fn, params, jnp.ones((2, 3)))
    assert layout == {"h.0/kernel": "io", "hx0/kernel": "ioo"}
    tree = lora_jax.apply(params, rank=2, layout=layout)
    assert tree["h.0"]["kernel"].num_batch_axes == 1 and tree["hx0"]["kernel"].roles == "ioo"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(lora_jax.wrap(fn, strict=True)(tree, jnp.ones((2, 3))),
                                   fn(params, jnp.ones((2, 3))), rtol=1e-6)
