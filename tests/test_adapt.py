"""`apply`, `split`, `combine`, `merge`: inits against float64 NumPy, targeting, and errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lora_jax
from helpers import merged_weight_np, randomize_adapters

KEY = jax.random.key(0)


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
    tree = lora_jax.apply(params, rank=4, init=init)
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
    tree = lora_jax.apply(params, rank=3, init="pissa", alpha=6.0)
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
    tree = lora_jax.apply(params, rank=2, init="olora")
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
    tree = lora_jax.apply(params, rank=4, alpha=16, targets=r"kernel$", exclude="head",
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
        lora_jax.apply(params, rank=0, targets="Dense_0/kernel")
    with pytest.raises(ValueError, match=r"rank 6 .*\[1, 5\]"):
        lora_jax.apply(params, rank=6, targets="head")
    with pytest.raises(ValueError, match=r"matched no parameter.*enc/Dense_0/kernel"):
        lora_jax.apply(params, rank=2, targets="nope")
    with pytest.raises(ValueError, match=r"cannot be adapted.*enc/Dense_0/bias"):
        lora_jax.apply(params, rank=2, targets="Dense_0")
    with pytest.raises(ValueError, match=r"cannot be adapted.*step int32"):
        lora_jax.apply(params, rank=2, targets="step")
    with pytest.raises(ValueError, match=r"unknown init 'svd'.*pissa"):
        lora_jax.apply(params, init="svd")
    with pytest.raises(ValueError, match="layout"):
        lora_jax.apply(params, rank=2, targets="head", layout={"head": "ii"})
    with pytest.raises(ValueError, match="already hold LoRA"):
        lora_jax.apply(lora_jax.apply(params, rank=2), rank=2)


def test_split_combine_roundtrip_and_trainable_extras():
    tree = randomize_adapters(lora_jax.apply(params_tree(), rank=2, exclude="head"), KEY)
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
    tree = lora_jax.apply(params_tree(), rank=2)
    trainable, frozen = lora_jax.split(tree)
    other_t, other_f = lora_jax.split(lora_jax.apply(params_tree(), rank=2, exclude="head"))
    with pytest.raises(ValueError, match="LoRA node in one tree only"):
        lora_jax.combine(trainable, other_f)
    with pytest.raises(ValueError, match="different structures"):
        lora_jax.combine(trainable, {"enc": frozen["enc"]})
    with pytest.raises(ValueError, match="different LoRA settings"):
        lora_jax.combine(trainable, lora_jax.split(lora_jax.apply(params_tree(), rank=2, alpha=5))[1])
    with pytest.raises(ValueError, match="needs a .* and b"):
        other = params_tree()
        other["head"]["kernel"] = jnp.ones((9, 6))
        lora_jax.combine(trainable, lora_jax.split(lora_jax.apply(other, rank=2))[1])
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
    tree = lora_jax.apply({"k": jax.random.normal(jax.random.key(seed), shape)}, rank=r, alpha=3.0)
    tree = randomize_adapters(tree, jax.random.key(seed + 1))
    np.testing.assert_allclose(lora_jax.merge(tree)["k"], merged_weight_np(tree["k"]), rtol=1e-5, atol=1e-5)
