"""`lora_jax.paired` and `lora_jax.merge_pairs`: LoRA factors stored as sibling leaves.

The oracle of `paired(tx)` is `tx` itself on this library's own `LoRA` nodes holding the same
factors and gradients (whose maths has its own float64 oracles in test_lora_pro*.py): the two must
agree on every leaf, for every transformation, across plain dicts, scan-stacked factors,
multi-axis (einsum) factors and bf16 adapters, while leaves outside any pair pass through `tx`
unchanged. `merge_pairs` is checked against a float64 NumPy ``w + s·a@b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax
from lora_jax.node import LoRA, is_lora
from lora_jax.paths import flatten_with_paths
from support.probes import flops
from test_lora_pro_grouped import count_primitive


def _factor(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-1]), dtype)


def own_tree(seed, *, layers=2, stacked=0, dtype=jnp.float32):
    """A tree of `LoRA(w=None)` nodes (and a plain `norm` leaf per layer), the way lora_jax's
    own optimizers see the trainable half: the oracle side."""
    rng = np.random.default_rng(seed)
    lead = (3,) * stacked
    kinds = {  # name: (a shape after batch axes, b shape after batch axes, roles, scale)
        "query": ((16, 4), (4, 2, 8), "ioo", 2.0),        # einsum 'btd,dhk->bthk', Qwix keeps (h, k)
        "out": ((2, 8, 4), (4, 16), "iio", 2.0),          # einsum 'bthk,hkd->btd'
        "mlp_in": ((16, 4), (4, 32), "io", 0.5),
        "mlp_out": ((32, 4), (4, 16), "io", 0.5),
        "head": ((16, 2), (2, 5), "io", 1.0),             # a second rank group
    }

    def layer():
        t = {k: LoRA(w=None, a=_factor(rng, lead + sa, dtype), b=_factor(rng, lead + sb, dtype),
                     scale=s, roles=roles) for k, (sa, sb, roles, s) in kinds.items()}
        t["norm"] = jnp.asarray(rng.normal(size=lead + (16,)), jnp.float32)
        return t

    return {f"layer_{i}": layer() for i in range(layers)}


def to_siblings(tree, a="kernel_lora_a", b="kernel_lora_b"):
    """The same factors as Qwix stores them: ``{name: {kernel_lora_a, kernel_lora_b}}``."""
    def conv(x):
        if is_lora(x):
            return {a: x.a, b: x.b}
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(tree)


def scales_of(tree):
    """{path of the pair's `a` leaf in `to_siblings(tree)`: scale}."""
    return {p + "/kernel_lora_a": x.scale for p, x in flatten_with_paths(tree, is_leaf=is_lora)[0] if is_lora(x)}


def _flat(tree):
    return flatten_with_paths(tree)[0]


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


TRANSFORMS = {
    "lora_pro": lambda: lora_jax.lora_pro(),
    "lora_pro[zero]": lambda: lora_jax.lora_pro(x="zero"),
    "chain(lora_pro, adamw)": lambda: optax.chain(lora_jax.lora_pro(), optax.adamw(1e-2)),
    "lora_pro_adamw": lambda: lora_jax.lora_pro_adamw(1e-2, weight_decay=0.1),
    "riemannian": lambda: lora_jax.riemannian(1e-3),
    "chain(clip, riemannian, adam)": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                                         lora_jax.riemannian(1e-3), optax.adam(1e-2)),
    "loraplus": lambda: lora_jax.loraplus(optax.adam(1e-2), ratio=4.0),
}
F64 = {  # the r×r algebra in float64 too (its default is float32)
    "lora_pro[f64]": lambda: lora_jax.lora_pro(compute_dtype=jnp.float64),
    "lora_pro_adamw[f64]": lambda: lora_jax.lora_pro_adamw(1e-2, weight_decay=0.1, compute_dtype=jnp.float64),
}


def _steps(tx, params, grads, n=2):
    upd = jax.jit(tx.update)
    state = tx.init(params)
    outs = []
    for _ in range(n):
        u, state = upd(grads, state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs


def _compare(own_params, own_grads, tx_name, stacked, tol):
    params, grads = to_siblings(own_params), to_siblings(own_grads)
    scales = scales_of(own_params)
    make = {**TRANSFORMS, **F64}[tx_name]
    paired = lora_jax.paired(make(), a="lora_a", b="lora_b",
                             scale=lambda p: scales[p], batch_axes=stacked)
    got = _steps(paired, params, grads)
    ref = [to_siblings(u) for u in _steps(make(), own_params, own_grads)]
    for g, r in zip(got, ref):
        assert jax.tree.structure(g) == jax.tree.structure(grads)
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(r)):
            assert x.dtype == y.dtype and x.shape == y.shape, path
            assert _rel(x, y) <= tol, (jax.tree_util.keystr(path), _rel(x, y))
    return got


@pytest.mark.parametrize("tx_name", list(TRANSFORMS))
def test_paired_equals_own_nodes(tx_name):
    own, own_g = own_tree(0), own_tree(1)
    _compare(own, own_g, tx_name, 0, 1e-6)


@pytest.mark.parametrize("tx_name", ["lora_pro", "lora_pro_adamw", "riemannian"])
def test_paired_equals_own_nodes_scan_stacked(tx_name):
    own, own_g = own_tree(2, stacked=1), own_tree(3, stacked=1)
    _compare(own, own_g, tx_name, 1, 1e-6)


@pytest.mark.parametrize("tx_name", ["lora_pro", "lora_pro_adamw"])
def test_paired_equals_own_nodes_bf16_adapters(tx_name):
    own, own_g = own_tree(4, dtype=jnp.bfloat16), own_tree(5, dtype=jnp.bfloat16)
    # both sides round the same float32 result to bf16; the groups' order may differ by one ulp
    _compare(own, own_g, tx_name, 0, 4e-3)


def test_paired_float64_matches_own_nodes_to_1e_10():
    with jax.enable_x64(True):
        own, own_g = own_tree(6, dtype=jnp.float64), own_tree(7, dtype=jnp.float64)
        for name in F64:
            out = _compare(own, own_g, name, 0, 1e-10)
            assert all(x.dtype == jnp.float64 for u in out for k, x in _flat(u) if "lora" in k)


def test_unpaired_leaves_go_to_tx_unchanged():
    own, own_g = own_tree(8, layers=1), own_tree(9, layers=1)
    params, grads = to_siblings(own), to_siblings(own_g)
    u, _ = lora_jax.paired(lora_jax.lora_pro()).update(grads, lora_jax.paired(lora_jax.lora_pro()).init(params), params)
    np.testing.assert_array_equal(u["layer_0"]["norm"], grads["layer_0"]["norm"])
    # and through adamw, exactly adamw's update of that leaf
    tx = lora_jax.paired(optax.chain(lora_jax.lora_pro(), optax.adamw(1e-2)))
    u, _ = tx.update(grads, tx.init(params), params)
    ref, _ = optax.adamw(1e-2).update(grads["layer_0"]["norm"], optax.adamw(1e-2).init(params["layer_0"]["norm"]),
                                      params["layer_0"]["norm"])
    np.testing.assert_allclose(u["layer_0"]["norm"], ref, rtol=1e-6)


def projection_np(a, b, g):
    """Orthogonal projection of a kernel gradient g (I, O) onto the tangent space of K = a@b at
    (a, b): the range of a on the left plus the row space of b on the right (float64)."""
    pa = a @ np.linalg.solve(a.T @ a, a.T)
    pb = b.T @ np.linalg.solve(b @ b.T, b)
    return pa @ g + g @ pb - pa @ g @ pb


def test_projection_property_on_pairs():
    """LoRA-Pro's defining law, on a paired tree in float64: with gradients taken from a full
    kernel gradient G (ga = s·G bᵀ, gb = s·aᵀG), the factored change s·(ga' b + a gb') of the
    adjusted pair is the orthogonal projection of G onto the LoRA tangent space."""
    rng = np.random.default_rng(10)
    I, O, r, s = 12, 7, 3, 1.7
    with jax.enable_x64(True):
        a, b, G = rng.normal(size=(I, r)), rng.normal(size=(r, O)), rng.normal(size=(I, O))
        params = {"mlp": {"kernel_lora_a": jnp.asarray(a), "kernel_lora_b": jnp.asarray(b)},
                  "norm": jnp.ones(3)}
        grads = {"mlp": {"kernel_lora_a": jnp.asarray(s * G @ b.T), "kernel_lora_b": jnp.asarray(s * a.T @ G)},
                 "norm": jnp.ones(3)}
        for x in ("sylvester", "zero", "symmetric"):
            tx = lora_jax.paired(lora_jax.lora_pro(x=x, damping=0.0, compute_dtype=jnp.float64), scale=s)
            u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
            dK = s * (np.asarray(u["mlp"]["kernel_lora_a"]) @ b + a @ np.asarray(u["mlp"]["kernel_lora_b"]))
            assert _rel(dK, projection_np(a, b, G)) <= 1e-10, x


# ------------------------------------------------------------------------------------------------
# errors: never a silent no-op
# ------------------------------------------------------------------------------------------------

def _pair(I=6, O=5, r=2):
    rng = np.random.default_rng(0)
    return _factor(rng, (I, r)), _factor(rng, (r, O))


@pytest.mark.parametrize("tree, match", [
    ({"w_lora_a": _pair()[0]}, r"'w_lora_a'.*no 'w_lora_b' beside it"),
    ({"w_lora_b": _pair()[1], "x": jnp.ones(3)}, r"'w_lora_b'.*no factor `a`"),
    ({"w_lora_a": _pair(r=2)[0], "w_lora_b": _pair(r=3)[1]}, r"disagree on the rank"),
    ({"w_lora_a": _pair()[0].T, "w_lora_b": _pair()[1].T}, r"transposed"),
    ({"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, r"no LoRA factor pair.*'kernel'"),
    ({"w_lora_a": jnp.ones(3), "w_lora_b": jnp.ones((1, 3))}, r"at least 2 axes"),
])
def test_bad_trees_raise_naming_the_path(tree, match):
    tx = lora_jax.paired(lora_jax.lora_pro())
    with pytest.raises(ValueError, match=match):
        tx.init(tree)
    with pytest.raises(ValueError, match=match):
        lora_jax.merge_pairs({**tree, "w": jnp.ones((6, 5))})


def test_batch_axes_mismatch_and_bad_arguments():
    a, b = _pair()
    tree = {"w_lora_a": jnp.stack([a, a]), "w_lora_b": jnp.stack([b, b, b])}
    with pytest.raises(ValueError, match="disagree on their 1 batch axes"):
        lora_jax.paired(lora_jax.lora_pro(), batch_axes=1).init(tree)
    with pytest.raises(ValueError, match="batch_axes must be an int"):
        lora_jax.paired(lora_jax.lora_pro(), batch_axes=-1).init(tree)
    with pytest.raises(ValueError, match="two different non-empty names"):
        lora_jax.paired(lora_jax.lora_pro(), a="lora", b="lora").init(tree)
    with pytest.raises(TypeError, match="must be a number"):
        lora_jax.paired(lora_jax.lora_pro(), scale=lambda p: "two").init({"w_lora_a": a, "w_lora_b": b})


def test_update_without_params_or_with_other_structure_raises():
    a, b = _pair()
    tree = {"w_lora_a": a, "w_lora_b": b}
    tx = lora_jax.paired(lora_jax.lora_pro())
    st = tx.init(tree)
    with pytest.raises(ValueError, match="params"):
        tx.update(tree, st)
    with pytest.raises(ValueError, match="different tree structures"):
        tx.update({**tree, "extra": jnp.ones(2)}, st, tree)


def test_keras_names():
    a, b = _pair()
    tree = {"dense/lora_kernel_a": a, "dense/lora_kernel_b": b, "dense/kernel": jnp.ones((6, 5))}
    tx = lora_jax.paired(lora_jax.lora_pro(), a="lora_kernel_a", b="lora_kernel_b", scale=2.0)
    u, _ = tx.update(tree, tx.init(tree), tree)
    ref, _ = lora_jax.lora_pro().update({"k": LoRA(w=None, a=a, b=b, scale=2.0, roles="io")}, None,
                                        {"k": LoRA(w=None, a=a, b=b, scale=2.0, roles="io")})
    np.testing.assert_allclose(u["dense/lora_kernel_a"], ref["k"].a, rtol=1e-6)
    np.testing.assert_allclose(u["dense/lora_kernel_b"], ref["k"].b, rtol=1e-6)
    merged = lora_jax.merge_pairs(tree, a="lora_kernel_a", b="lora_kernel_b", weight="kernel", scale=2.0)
    assert set(merged) == {"dense/kernel"}
    np.testing.assert_allclose(merged["dense/kernel"], 1 + 2.0 * np.asarray(a, np.float64) @ np.asarray(b, np.float64),
                               rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# merge_pairs
# ------------------------------------------------------------------------------------------------

def _np(x):
    return np.asarray(x, np.float64)


def test_merge_pairs_qwix_einsum_and_dense_vs_numpy():
    rng = np.random.default_rng(12)
    d, h, k, r, s = 16, 2, 8, 4, 2.0
    tree = {"attn": {"query": {"kernel": _factor(rng, (d, h, k)),                 # 'btd,dhk->bthk'
                               "kernel_lora_a": _factor(rng, (d, r)),
                               "kernel_lora_b": _factor(rng, (r, h, k))},
                     "out": {"kernel": _factor(rng, (h, k, d)),                   # 'bthk,hkd->btd'
                             "kernel_lora_a": _factor(rng, (h, k, r)),
                             "kernel_lora_b": _factor(rng, (r, d))}},
            "mlp": {"kernel": _factor(rng, (d, 32), jnp.bfloat16),
                    "kernel_lora_a": _factor(rng, (d, r)), "kernel_lora_b": _factor(rng, (r, 32)),
                    "bias": jnp.ones(32)}}
    merged = lora_jax.merge_pairs(tree, scale=s)
    assert jax.tree.structure(merged) == jax.tree.structure(
        {"attn": {"query": {"kernel": 0}, "out": {"kernel": 0}}, "mlp": {"kernel": 0, "bias": 0}})
    q, o, m = tree["attn"]["query"], tree["attn"]["out"], tree["mlp"]
    ref_q = _np(q["kernel"]) + s * np.einsum("dr,rhk->dhk", _np(q["kernel_lora_a"]), _np(q["kernel_lora_b"]))
    ref_o = _np(o["kernel"]) + s * np.einsum("hkr,rd->hkd", _np(o["kernel_lora_a"]), _np(o["kernel_lora_b"]))
    ref_m = _np(m["kernel"]) + s * _np(m["kernel_lora_a"]) @ _np(m["kernel_lora_b"])
    assert _rel(merged["attn"]["query"]["kernel"], ref_q) <= 1e-6
    assert _rel(merged["attn"]["out"]["kernel"], ref_o) <= 1e-6
    assert merged["mlp"]["kernel"].dtype == jnp.bfloat16
    assert _rel(merged["mlp"]["kernel"], ref_m) <= 4e-3  # one bf16 rounding of the float32 sum


def test_merge_pairs_roles_for_out_first_weights_and_stacked():
    rng = np.random.default_rng(13)
    L, d, h, k, r = 3, 16, 2, 8, 4
    # a weight laid out (heads, d, head_dim): roles 'oio'; scan-stacked over L layers
    w = _factor(rng, (L, h, d, k))
    fa, fb = _factor(rng, (L, d, r)), _factor(rng, (L, r, h, k))
    merged = lora_jax.merge_pairs({"w": w, "w_lora_a": fa, "w_lora_b": fb}, batch_axes=1, roles="oio",
                                  scale=0.5)
    ref = _np(w) + 0.5 * np.einsum("ldr,lrhk->lhdk", _np(fa), _np(fb))
    assert _rel(merged["w"], ref) <= 1e-6
    with pytest.raises(ValueError, match="does not start with input axes"):
        lora_jax.merge_pairs({"w": w, "w_lora_a": fa, "w_lora_b": fb}, batch_axes=1)
    with pytest.raises(ValueError, match="which is not in the tree"):
        lora_jax.merge_pairs({"v": w, "w_lora_a": fa, "w_lora_b": fb}, batch_axes=1)


def test_merge_pairs_nnx_lora_linear_state():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.LoRALinear(6, 5, lora_rank=2, rngs=rngs), nnx.LoRALinear(5, 3, lora_rank=2, rngs=rngs))
    for layer in model.layers:  # b = 0 after init would hide the product
        layer.lora.lora_b[...] = jax.random.normal(jax.random.key(1), layer.lora.lora_b.shape)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    merged = lora_jax.merge_pairs(nnx.state(model), weight="../kernel")
    plain = nnx.Sequential(nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs))
    nnx.update(plain, merged)  # every lora leaf gone, and its `lora` submodule with it
    assert "lora" not in str(jax.tree_util.tree_flatten_with_path(merged)[0])
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_merge_pairs_refuses_factors_in_lists():
    a, b = _pair()
    with pytest.raises(ValueError, match="sits in a list"):
        lora_jax.merge_pairs({"w": jnp.ones((6, 5)), "f": [a, b]}, a="0", b="1", weight=lambda p: "w")


# ------------------------------------------------------------------------------------------------
# cost: 72 pairs keep the grouping and the FLOPs of lora_jax's own nodes
# ------------------------------------------------------------------------------------------------

def big_own_tree(seed, layers=12):
    """12 layers × 6 adapted weights (72 pairs) at rank 8, and a rank-4 bf16 head."""
    rng = np.random.default_rng(seed)
    shapes = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64), "ffn_in": (64, 256),
              "ffn_out": (256, 64)}
    t = {f"layer_{i}": {n: LoRA(w=None, a=_factor(rng, (I, 8)), b=_factor(rng, (8, O)), scale=2.0,
                                roles="io") for n, (I, O) in shapes.items()} for i in range(layers)}
    t["head"] = {"proj": LoRA(w=None, a=_factor(rng, (64, 4), jnp.bfloat16),
                              b=_factor(rng, (4, 10), jnp.bfloat16), scale=1.0, roles="io")}
    return t


def cost_pair(tx_fn):
    """(compiled paired update, compiled own-node update) on the 72-pair tree, and their args."""
    own, own_g = big_own_tree(0), big_own_tree(1)
    params, grads = to_siblings(own), to_siblings(own_g)
    paired = lora_jax.paired(tx_fn(), scale=lambda p: 1.0 if p.startswith("head") else 2.0)
    tx = tx_fn()
    p_args = (grads, paired.init(params), params)
    o_args = (own_g, tx.init(own), own)
    return (jax.jit(paired.update).lower(*p_args).compile(), p_args,
            jax.jit(tx.update).lower(*o_args).compile(), o_args, paired, tx)


@pytest.mark.parametrize("tx_name", ["lora_pro", "lora_pro_adamw"])
def test_72_pairs_one_eigh_per_group_and_no_more_flops(tx_name):
    p_comp, p_args, o_comp, o_args, paired, tx = cost_pair(TRANSFORMS[tx_name])
    n_pairs = sum("kernel_lora_a" in k for k, _ in _flat(p_args[2]))
    assert n_pairs == 73
    n_paired = count_primitive(jax.make_jaxpr(paired.update)(*p_args).jaxpr, "eigh")
    n_own = count_primitive(jax.make_jaxpr(tx.update)(*o_args).jaxpr, "eigh")
    assert n_paired == n_own and 1 <= n_paired <= 2 * 2, (n_paired, n_own)  # groups (8, f32), (4, f32)
    ratio = flops(p_comp) / flops(o_comp)
    print(f"{tx_name}: paired/own-node update FLOPs = {ratio:.4f}, eigh {n_paired}")
    assert ratio <= 1.05


def test_paired_lora_pro_adamw_with_schedule_and_inject_hyperparams():
    own, own_g = own_tree(14, layers=1), own_tree(15, layers=1)
    params, grads = to_siblings(own), to_siblings(own_g)
    scales = scales_of(own)
    sched = optax.linear_schedule(1e-2, 0.0, 4)
    for make in (lambda: lora_jax.lora_pro_adamw(sched, weight_decay=0.1),
                 lambda: optax.chain(optax.clip_by_global_norm(0.5), lora_jax.lora_pro_adamw(1e-2))):
        got = _steps(lora_jax.paired(make(), scale=lambda p: scales[p]), params, grads)
        ref = [to_siblings(u) for u in _steps(make(), own, own_g)]
        for g, r in zip(got, ref):
            assert max(_rel(x, y) for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(r))) <= 1e-6
    # inject_hyperparams: the learning rate is read from the state, through paired
    tx = lora_jax.paired(optax.inject_hyperparams(lora_jax.lora_pro_adamw)(learning_rate=1e-2),
                         scale=lambda p: scales[p])
    st = tx.init(params)
    u1, _ = tx.update(grads, st, params)
    st.hyperparams["learning_rate"] = jnp.asarray(3e-2)
    u2, _ = tx.update(grads, st, params)
    for x, y in zip(jax.tree.leaves(u2), jax.tree.leaves(u1)):
        np.testing.assert_allclose(x, 3 * y, rtol=1e-5, atol=1e-9)
