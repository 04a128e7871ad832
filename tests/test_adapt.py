"""`apply`, `split`, `combine`, `merge`: inits against float64 NumPy, targeting, and errors."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import lora_jax
from helpers import merged_weight_np, randomize_adapters

KEY = jax.random.key(0)
LAYOUT = {"stack": "io"}  # enc/stack/kernel (3, 20, 9): layers, in, out


def params_tree(dtype=jnp.float32):
    k = jax.random.split(KEY, 4)
    return {
        "enc": {"Dense_0": {"kernel": jax.random.normal(k[0], (12, 20), dtype), "bias": jnp.zeros(20, dtype)},
                "stack": {"kernel": jax.random.normal(k[1], (3, 20, 9), dtype)}},
        "Embed_0": {"embedding": jax.random.normal(k[2], (30, 12), dtype)},
        "head": {"kernel": jax.random.normal(k[3], (9, 5), dtype)},
        "step": jnp.array(3, jnp.int32),
    }


def nodes(tree):
    return {p: n for p, n in zip(*_paths(tree)) if lora_jax.is_lora(n)}


def _paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lora_jax.is_lora)[0]
    return ["/".join(str(getattr(e, "key", e)) for e in p) for p, _ in leaves], [v for _, v in leaves]


@pytest.mark.parametrize("init", ["lora", "gaussian"])
def test_random_inits_start_exactly_at_the_base_model(init):
    params = params_tree()
    tree = lora_jax.apply(params, layout=LAYOUT, rank=4, init=init)
    assert set(nodes(tree)) == {"enc/Dense_0/kernel", "enc/stack/kernel", "head/kernel"}
    merged = lora_jax.merge(tree)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    node = tree["enc"]["Dense_0"]["kernel"]
    assert node.a.shape == (12, 4) and node.b.shape == (4, 20) and not np.any(node.b)
    if init == "lora":  # PEFT's kaiming_uniform(a=√5): U(±1/√fan_in)
        assert np.abs(node.a).max() <= 1 / np.sqrt(12) and np.abs(node.a).max() > 0.5 / np.sqrt(12)
    stacked = tree["enc"]["stack"]["kernel"]
    assert stacked.a.shape == (3, 20, 4) and stacked.b.shape == (3, 4, 9)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_pissa_is_the_top_r_svd_and_starts_at_the_base_model(dtype, tol):
    params = params_tree(dtype)
    tree = lora_jax.apply(params, layout=LAYOUT, rank=3, init="pissa", alpha=6.0)
    for path, node in nodes(tree).items():
        w0 = np.asarray(_get(params, path), np.float64)
        merged = merged_weight_np(node)
        assert np.linalg.norm(merged - w0) / np.linalg.norm(w0) <= tol
        # the adapter holds the principal part: scale·a@b = U_r S_r V_rᵀ (per stacked slice)
        delta = merged - np.asarray(node.w, np.float64)
        mats = w0.reshape((-1,) + w0.shape[-2:])
        for d, m in zip(delta.reshape(mats.shape), mats):
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            np.testing.assert_allclose(d, (u[:, :3] * s[:3]) @ vt[:3], atol=5 * tol * s[0])


def test_olora_uses_qr_and_starts_at_the_base_model():
    params = params_tree()
    tree = lora_jax.apply(params, layout=LAYOUT, rank=2, init="olora")
    node = tree["head"]["kernel"]
    w0 = np.asarray(params["head"]["kernel"], np.float64)
    q, r = np.linalg.qr(w0.T)  # PEFT's orientation: W = Kᵀ = Q R, B = Q_r, A = R_r
    sign = np.sign(np.diag(r)[:2]) * np.sign(np.diag(np.asarray(node.a, np.float64))[:2])
    np.testing.assert_allclose(np.asarray(node.b), sign[:, None] * q[:, :2].T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(node.a), (sign[:, None] * r[:2]).T, atol=1e-5)
    for path, node in nodes(tree).items():
        w0 = np.asarray(_get(params, path), np.float64)
        assert np.linalg.norm(merged_weight_np(node) - w0) / np.linalg.norm(w0) < 2e-6


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_targets_exclude_patterns_and_scale():
    params = params_tree()
    tree = lora_jax.apply(params, layout=LAYOUT, rank=4, alpha=16, targets=r"kernel$", exclude="head",
                          rank_pattern={"stack": 2}, alpha_pattern={"Dense_0": 4.0})
    got = nodes(tree)
    assert set(got) == {"enc/Dense_0/kernel", "enc/stack/kernel"}
    assert got["enc/Dense_0/kernel"].scale == 1.0 and got["enc/Dense_0/kernel"].rank == 4
    assert got["enc/stack/kernel"].rank == 2 and got["enc/stack/kernel"].scale == 8.0
    rs = lora_jax.apply(params, rank=4, alpha=16, rslora=True, targets="head")
    assert rs["head"]["kernel"].scale == 8.0  # alpha / sqrt(r)
    pred = lora_jax.apply(params, rank=1, targets=lambda path, leaf: path.startswith("head"))
    assert set(nodes(pred)) == {"head/kernel"}
    emb = lora_jax.apply(params, rank=2, targets="embedding")
    assert nodes(emb)["Embed_0/embedding"].a.shape == (30, 2)


def test_bad_input_errors():
    params = params_tree()
    with pytest.raises(ValueError, match=r"rank 0 .*\[1, 12\]"):
        lora_jax.apply(params, layout=LAYOUT, rank=0, targets="Dense_0/kernel")
    with pytest.raises(ValueError, match=r"rank 6 .*\[1, 5\]"):  # an explicit rank must fit
        lora_jax.apply(params, layout=LAYOUT, rank=4, targets="head", rank_pattern={"head": 6})
    with pytest.raises(ValueError, match=r"matched no parameter.*enc/Dense_0/kernel"):
        lora_jax.apply(params, layout=LAYOUT, rank=2, targets="nope")
    with pytest.raises(ValueError, match=r"cannot be adapted.*enc/Dense_0/bias"):
        lora_jax.apply(params, layout=LAYOUT, rank=2, targets="Dense_0")
    with pytest.raises(ValueError, match=r"cannot be adapted.*step int32"):
        lora_jax.apply(params, layout=LAYOUT, rank=2, targets="step")
    with pytest.raises(ValueError, match=r"unknown init 'svd'.*pissa"):
        lora_jax.apply(params, layout=LAYOUT, init="svd")
    with pytest.raises(ValueError, match="layout"):
        lora_jax.apply(params, rank=2, targets="head", layout={"head": "ii"})
    with pytest.raises(ValueError, match="already hold LoRA"):
        lora_jax.apply(lora_jax.apply(params, layout=LAYOUT, rank=2), layout=LAYOUT, rank=2)


def test_split_combine_roundtrip_and_trainable_extras():
    tree = randomize_adapters(lora_jax.apply(params_tree(), layout=LAYOUT, rank=2, exclude="head"), KEY)
    trainable, frozen = lora_jax.split(tree, trainable="head")
    t_node = trainable["enc"]["Dense_0"]["kernel"]
    f_node = frozen["enc"]["Dense_0"]["kernel"]
    assert t_node.w is None and t_node.a is not None and f_node.a is None and f_node.w is not None
    assert trainable["head"]["kernel"] is not None and frozen["head"]["kernel"] is None
    assert trainable["enc"]["Dense_0"]["bias"] is None and trainable["step"] is None
    # nothing of a frozen kernel's size is in the trainable half
    assert max(x.size for x in jax.tree.leaves(trainable)) == max(
        tree["head"]["kernel"].size, 20 * 2 * 3)
    back = lora_jax.combine(trainable, frozen)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(a, b)


def test_combine_and_merge_reject_mismatched_trees():
    tree = lora_jax.apply(params_tree(), layout=LAYOUT, rank=2)
    trainable, frozen = lora_jax.split(tree)
    other_t, other_f = lora_jax.split(lora_jax.apply(params_tree(), layout=LAYOUT, rank=2, exclude="head"))
    with pytest.raises(ValueError, match="LoRA node in one tree only"):
        lora_jax.combine(trainable, other_f)
    with pytest.raises(ValueError, match="different structures"):
        lora_jax.combine(trainable, {"enc": frozen["enc"]})
    with pytest.raises(ValueError, match="different LoRA settings"):
        other = lora_jax.apply(params_tree(), layout=LAYOUT, rank=2, alpha=5)
        lora_jax.combine(trainable, lora_jax.split(other)[1])
    with pytest.raises(ValueError, match="needs a .* and b"):
        other = params_tree()
        other["head"]["kernel"] = jnp.ones((9, 6))
        lora_jax.combine(trainable, lora_jax.split(lora_jax.apply(other, layout=LAYOUT, rank=2))[1])
    with pytest.raises(ValueError, match="trainable half"):
        lora_jax.merge(trainable)
    with pytest.raises(ValueError, match="frozen half"):
        lora_jax.merge(frozen)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), r=st.integers(1, 9), batch=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_merge_equals_numpy_oracle(m, n, r, batch, seed):
    """Law: merge(w, a, b) = w + scale·a@b (float64 NumPy), for any shapes and stacked axes."""
    r = min(r, m, n)
    shape = (2,) * batch + (m, n)
    tree = lora_jax.apply({"k": jax.random.normal(jax.random.key(seed), shape)}, rank=r, alpha=3.0,
                          layout={"k": "io"})
    tree = randomize_adapters(tree, jax.random.key(seed + 1))
    np.testing.assert_allclose(lora_jax.merge(tree)["k"], merged_weight_np(tree["k"]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# rank capped at min(in, out); no guessing for kernels of 3 or more axes; exact layout keys
# ------------------------------------------------------------------------------------------------

def test_rank_is_capped_at_min_in_out_with_one_warning():
    params = params_tree() | {"tiny": {"kernel": jnp.ones((6, 2))}}
    with pytest.warns(UserWarning) as rec:
        tree = lora_jax.apply(params, rank=8, layout=LAYOUT)
    capped = [w for w in rec if "exceeds min(in, out)" in str(w.message)]
    assert len(capped) == 1
    msg = str(capped[0].message)
    assert "head/kernel (9, 5) -> r=5" in msg and "tiny/kernel (6, 2) -> r=2" in msg
    assert "Dense_0" not in msg and "stack" not in msg
    got = nodes(tree)
    assert got["head/kernel"].rank == 5 and got["tiny/kernel"].rank == 2
    assert got["enc/Dense_0/kernel"].rank == 8 and got["enc/stack/kernel"].rank == 8
    # scale = alpha / r with the r used: alpha defaults to that r (scale 1)
    assert got["head/kernel"].scale == 1.0 and got["enc/Dense_0/kernel"].scale == 1.0
    with pytest.warns(UserWarning, match="exceeds"):
        got = nodes(lora_jax.apply(params, rank=8, alpha=16, layout=LAYOUT))
    assert got["head/kernel"].scale == 16 / 5 and got["enc/Dense_0/kernel"].scale == 2.0
    with pytest.warns(UserWarning, match="exceeds"):
        got = nodes(lora_jax.apply(params, rank=8, alpha=16, rslora=True, layout=LAYOUT))
    assert got["tiny/kernel"].scale == pytest.approx(16 / np.sqrt(2))


def test_kernels_of_three_or_more_axes_need_a_layout():
    params = params_tree()
    with pytest.raises(ValueError, match=r"'enc/stack/kernel' \(3, 20, 9\).*layout_of.*layout=\{"):
        lora_jax.apply(params, rank=2)
    with pytest.raises(ValueError, match="layout_of"):
        lora_jax.default_roles("layers/query/kernel", (4, 32, 32))
    assert lora_jax.default_roles("layers/query/kernel", (32, 32)) == "io"
    assert lora_jax.default_roles("Conv_0/kernel", (3, 3, 4, 8)) == "iiio"
    assert set(nodes(lora_jax.apply(params, rank=2, exclude="stack"))) == {"enc/Dense_0/kernel",
                                                                           "head/kernel"}


def test_exact_path_keys_win_over_regexes():
    params = {"a.b": {"kernel": jnp.ones((4, 6, 5))}, "axb": {"kernel": jnp.ones((4, 6, 5))}}
    # as regexes, "a.b/kernel" also matches "axb/kernel"; as keys each names its own path
    tree = lora_jax.apply(params, rank=2, layout={"a.b/kernel": "io", "axb/kernel": "ioo"})
    assert tree["a.b"]["kernel"].roles == "io" and tree["axb"]["kernel"].roles == "ioo"
    tree = lora_jax.apply(params, rank=2, layout={"kernel": "io"}, rank_pattern={"axb/kernel": 1,
                                                                                  "kernel": 3})
    assert tree["a.b"]["kernel"].rank == 3 and tree["axb"]["kernel"].rank == 1


def _sylvester_oracle(A, B, gA, gB, s):
    """LoRA-Pro's adjusted gradients, paper orientation (A = aᵀ, B = bᵀ), float64, exact inverses."""
    import scipy.linalg as sl
    Bi, Ai = np.linalg.inv(B.T @ B), np.linalg.inv(A @ A.T)
    X = sl.solve_sylvester(B.T @ B, A @ A.T, -(1 / s**2) * Bi @ gA @ A.T)
    gA2 = (1 / s**2) * Bi @ gA + X @ A
    gB2 = (1 / s**2) * (np.eye(B.shape[0]) - B @ Bi @ B.T) @ gB @ Ai - B @ X
    return gA2, gB2


def test_lora_pro_on_a_capped_full_rank_node_is_exact_and_finite():
    """r = min(in, out) = out: b is square, the tangent space is all of (in, out), and LoRA-Pro's
    equivalent gradient is the full gradient itself."""
    rng = np.random.default_rng(3)
    with pytest.warns(UserWarning, match="exceeds"):
        tree = lora_jax.apply({"head": {"kernel": jnp.ones((16, 2))}}, rank=8, alpha=4.0)
    node = tree["head"]["kernel"]
    assert node.rank == 2 and node.scale == 2.0
    s = node.scale
    a, b, gK = rng.normal(size=(16, 2)), rng.normal(size=(2, 2)), rng.normal(size=(16, 2))
    ga, gb = s * gK @ b.T, s * a.T @ gK
    mk = lambda a, b: {"head": {"kernel": lora_jax.LoRA(  # noqa: E731
        w=None, a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32), scale=s, roles="io")}}
    tx = lora_jax.lora_pro()
    out, _ = tx.update(mk(ga, gb), tx.init(mk(a, b)), mk(a, b))
    ga2, gb2 = (np.asarray(v, np.float64) for v in (out["head"]["kernel"].a, out["head"]["kernel"].b))
    gA2, gB2 = _sylvester_oracle(a.T, b.T, ga.T, gb.T, s)
    for got, want in ((ga2.T, gA2), (gb2.T, gB2)):
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
    equivalent = s * (ga2 @ b + a @ gb2)  # kernel orientation
    assert np.linalg.norm(equivalent - gK) <= 1e-4 * np.linalg.norm(gK)


def _finite_lora_pro_steps(fn, adapted, batch, labels, trainable=None, steps=3):
    """A few ``chain(lora_pro(), adamw)`` steps on a classification loss; returns the losses."""
    t, frozen = lora_jax.split(adapted, trainable=trainable)
    loss_fn = lora_jax.wrap(lambda p, x: optax.softmax_cross_entropy_with_integer_labels(
        fn(p, x), labels).mean(), strict=True)
    tx = optax.chain(lora_jax.lora_pro(), optax.adamw(1e-3))

    @jax.jit
    def step(t, st):
        value, g = jax.value_and_grad(lambda t: loss_fn(lora_jax.combine(t, frozen), batch))(t)
        u, st = tx.update(g, st, t)
        return optax.apply_updates(t, u), st, value

    st, values = tx.init(t), []
    for _ in range(steps):
        t, st, value = step(t, st)
        values.append(float(value))
    assert np.all(np.isfinite(values)) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(t))
    return values


def test_mlp_with_a_two_class_head_adapts_with_the_default_rank():
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(16), nn.relu, nn.Dense(2)])
    x = jax.random.normal(KEY, (8, 12))
    params = model.init(KEY, x)["params"]
    with pytest.warns(UserWarning, match=r"rank 8 exceeds.*layers_4/kernel \(16, 2\) -> r=2") as rec:
        adapted = lora_jax.apply(params, rank=8)
    assert sum("exceeds" in str(w.message) for w in rec) == 1
    assert adapted["layers_4"]["kernel"].rank == 2 and adapted["layers_0"]["kernel"].rank == 8
    labels = jnp.arange(8) % 2
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    _finite_lora_pro_steps(fn, randomize_adapters(adapted, KEY), x, labels)  # b ≠ 0: exercise the solve
    losses = _finite_lora_pro_steps(fn, adapted, x, labels, steps=5)       # b = 0 at init
    assert losses[-1] < losses[0]


def test_bert_classifier_with_a_two_class_head_adapts_with_the_default_rank():
    from train.bert import BertConfig, init_classifier
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    model, variables = init_classifier(config, 2, KEY)
    with pytest.warns(UserWarning, match=r"head/kernel \(16, 2\) -> r=2"):
        adapted = lora_jax.apply(variables, rank=8)
    head = adapted["params"]["head"]["kernel"]
    assert head.rank == 2 and head.scale == 1.0
    ids = jax.random.randint(KEY, (4, 8), 1, 50)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    _finite_lora_pro_steps(fn, adapted, ids, jnp.array([0, 1, 1, 0]))


class _TinyLM(nn.Module):
    """Embedding, one hidden Dense, and an untied projection onto the vocabulary named `head_name`."""
    vocab: int = 64
    head_name: str = "lm_head"

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, 16, name="embed_tokens")(ids)
        h = nn.gelu(nn.Dense(32, name="up")(h))
        h = nn.Dense(16, name="down")(h)
        return nn.Dense(self.vocab, use_bias=False, name=self.head_name)(h)


@pytest.mark.parametrize("head_name", ["lm_head", "output"])
def test_default_targets_leave_the_vocabulary_projection_out(head_name):
    """As PEFT's "all-linear": by name (`lm_head`) or, under any name, as the (d, V) kernel whose V
    is an embedding table's row count; naming it in `targets` adapts it after all."""
    model = _TinyLM(head_name=head_name)
    ids = jax.random.randint(KEY, (2, 5), 0, 64)
    params = model.init(KEY, ids)["params"]
    assert lora_jax.output_heads(params) == [f"{head_name}/kernel"]
    adapted = lora_jax.apply(params, rank=4)
    assert lora_jax.is_lora(adapted["up"]["kernel"]) and lora_jax.is_lora(adapted["down"]["kernel"])
    assert not lora_jax.is_lora(adapted[head_name]["kernel"])
    assert not lora_jax.is_lora(adapted["embed_tokens"]["embedding"])
    opted_in = lora_jax.apply(params, rank=4, targets=r"(up|down|lm_head|output)/kernel$")
    assert lora_jax.is_lora(opted_in[head_name]["kernel"])
    # the adapted model still runs, factored, and starts at the base model
    out = lora_jax.wrap(lambda p, ids: model.apply({"params": p}, ids), strict=True)(opted_in, ids)
    np.testing.assert_allclose(out, model.apply({"params": params}, ids), rtol=1e-6, atol=1e-6)


def test_a_square_kernel_matching_no_table_is_not_a_head():
    """A (d, d) kernel next to a (d, d) table is no vocabulary projection (V must exceed d), and a
    tree without embedding tables has no head but an explicit `lm_head`."""
    params = {"embed": {"embedding": jnp.ones((16, 16))}, "proj": {"kernel": jnp.ones((16, 16))},
              "wide": {"kernel": jnp.ones((16, 64))}}
    assert lora_jax.output_heads(params) == []
    assert lora_jax.is_lora(lora_jax.apply(params, rank=4)["wide"]["kernel"])
