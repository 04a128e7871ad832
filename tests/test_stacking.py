"""Several adapters on one base (`lora_jax.stack`): mixed-adapter batches against each adapter
alone (unmerged and merged), generation with mixed ids, the cost of a mixed batch, hot swaps
without recompiling, and K adapters trained in one vmapped step against K separate runs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from support import transformer as T
from tests.helpers import randomize_adapters
from train import bert, llama


def rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def to64(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)


def adapters(params, ranks, *, seed=0, std=0.3, **kwargs):
    """Adapted trees of `params`, one per rank, with random nonzero factors (α = 2r: one scale)."""
    return [randomize_adapters(lora_jax.apply(params, rank=r, alpha=2 * r, key=jax.random.key(seed + i),
                                              **kwargs), jax.random.key(100 + seed + i), std)
            for i, r in enumerate(ranks)]


def check_rows(run, stacked, singles, base, ids, *, tol, merged=True):
    """Each row of ``run(stacked, ids)`` against ``run(single)`` on that row, and against the merged
    tree run in float64; rows with id −1 against the base model."""
    out = np.asarray(run(stacked, ids))
    worst = 0.0
    for k, single in enumerate(singles):
        rows = np.flatnonzero(np.asarray(ids) == k)
        assert rows.size, f"adapter {k} unused"
        alone = np.asarray(run(single, None))
        worst = max(worst, rel(out[rows], alone[rows]))
        if merged:  # the merged weights in float64, run in float64: the float32 error of the rows
            with jax.enable_x64(True):
                m = np.asarray(run(lora_jax.merge(to64(single)), None))[rows]
            # float32 runs are ~1e-6 from float64 anyway (the plain model too): the mixed batch may
            # add no more than the 1e-6 allowed against the adapter alone
            assert rel(out[rows], m) <= rel(alone[rows], m) + tol
            print(f"adapter {k}: vs alone {rel(out[rows], alone[rows]):.2e}, vs merged (float64) "
                  f"{rel(out[rows], m):.2e}, alone vs merged {rel(alone[rows], m):.2e}")
        assert rel(alone[rows], base[rows]) > 1e-3  # the adapters do change these rows
    rows = np.flatnonzero(np.asarray(ids) == -1)
    np.testing.assert_array_equal(out[rows], base[rows])  # the base model alone, exactly
    assert worst <= tol, worst
    return worst


# ------------------------------------------------------------------------------------------------
# mixed-adapter batches


@pytest.fixture(scope="module")
def minilm():
    from train.assets import minilm_dir
    try:
        path = minilm_dir()
    except Exception as e:  # offline and not cached
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e!r}")
    config, params = bert.load_hf_safetensors(path)
    model, variables = bert.init_classifier(config, 3, jax.random.key(0), params, pooling="mean")
    return model, variables


@pytest.mark.parametrize("ranks", [(8, 8, 8), (4, 8, 2)], ids=["equal", "mixed"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mixed_batch_bert_rows_equal_each_adapter_alone(minilm, ranks, dora):
    model, variables = minilm
    singles = adapters(variables, ranks, std=0.05, targets=bert.LORA_TARGETS, dora=dora)
    stacked = lora_jax.stack(singles, pad_ranks=True)
    node = stacked["params"]["encoder"]["layer_0"]["query"]["kernel"]
    assert node.num_adapters == 3 and node.rank == max(ranks) and node.w is singles[0]["params"]["encoder"]["layer_0"]["query"]["kernel"].w
    rng = np.random.default_rng(0)
    ids = jnp.asarray([0, 1, 2, -1, 2, 1, 0, -1])
    tokens = jnp.asarray(rng.integers(1000, 20000, (8, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] < rng.integers(4, 13, (8, 1)), jnp.int32)
    fwd = jax.jit(lora_jax.wrap(model.apply))

    def run(tree, ids):
        return fwd(tree, tokens, mask) if ids is None else fwd(tree, tokens, mask, lora_adapter_ids=ids)

    base = np.asarray(jax.jit(model.apply)(variables, tokens, mask))
    worst = check_rows(run, stacked, singles, base, ids, tol=1e-6)
    print(f"BERT ranks {ranks} dora={dora}: worst row rel err {worst:.2e}")


@pytest.fixture(scope="module")
def tiny_llama():
    config = llama.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                               eos_token_id=None, bos_token_id=None)
    params = llama.init_params(config, jax.random.key(0))
    return llama.Llama(config), params


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 3)], ids=["equal", "mixed"])
def test_mixed_batch_llama_logits_and_generation(tiny_llama, ranks):
    model, params = tiny_llama
    singles = adapters(params, ranks, std=0.4, targets=llama.LORA_TARGETS)
    stacked = lora_jax.stack(singles, pad_ranks=True)
    ids = jnp.asarray([2, 0, -1, 1, 0, 2])
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (6, 7)), jnp.int32)
    fwd = jax.jit(lora_jax.wrap(lambda p, x: model.apply({"params": p}, x)))

    def run(tree, ids):
        return fwd(tree, tokens) if ids is None else fwd(tree, tokens, lora_adapter_ids=ids)

    base = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens))
    worst = check_rows(run, stacked, singles, base, ids, tol=1e-6)
    print(f"Llama ranks {ranks}: worst row rel err {worst:.2e}")

    prompts = [[5, 9, 11], [7], [3, 4, 5, 6], [1, 2], [8, 8, 8], [40, 41]]
    mixed = llama.generate(model, stacked, prompts, 6, adapter_ids=ids, eos_id=-1)
    for r, (prompt, k) in enumerate(zip(prompts, np.asarray(ids))):
        tree = params if k < 0 else singles[k]
        alone = llama.generate(model, tree, [prompt], 6, eos_id=-1, width=4)
        np.testing.assert_array_equal(mixed[r], alone[0])
    assert len({tuple(row) for row in mixed}) > 3  # the fine-tunes do answer differently


def test_hot_swaps_and_new_ids_never_recompile(tiny_llama):
    model, params = tiny_llama
    singles = adapters(params, (4, 4), targets=llama.LORA_TARGETS)
    stacked = lora_jax.stack(singles)
    fwd = jax.jit(lambda p, x, ids: lora_jax.wrap(lambda p, x: model.apply({"params": p}, x))(
        p, x, lora_adapter_ids=ids))
    x = jnp.zeros((4, 5), jnp.int32) + 3
    before = np.asarray(fwd(stacked, x, jnp.asarray([0, 1, 0, 1])))
    fresh = adapters(params, (4,), seed=7, targets=llama.LORA_TARGETS)[0]
    swapped = lora_jax.put_adapter(stacked, 1, fresh)
    after = np.asarray(fwd(swapped, x, jnp.asarray([0, 1, 0, 1])))
    fwd(swapped, x, jnp.asarray([-1, 1, 1, 0]))
    assert fwd._cache_size() == 1
    np.testing.assert_array_equal(after[0], before[0])  # adapter 0 untouched
    alone = np.asarray(jax.jit(lora_jax.wrap(lambda p, x: model.apply({"params": p}, x)))(fresh, x))
    assert rel(after[1], alone[1]) <= 1e-6 and rel(after[1], before[1]) > 1e-3
    # generation: the same compiled loop for other ids and swapped adapters
    prompts = [[5, 6], [7, 8], [9, 10]]
    llama.generate(model, stacked, prompts, 4, adapter_ids=[0, 1, -1], eos_id=-1)
    n = llama._generate._cache_size()
    llama.generate(model, swapped, prompts, 4, adapter_ids=[1, 1, 0], eos_id=-1)
    assert llama._generate._cache_size() == n


def test_mixed_batch_of_8_costs_at_most_110_of_one_adapter_and_forms_no_weight_per_adapter():
    cfg = T.Config(layers=2, d_model=256, d_ff=1024, heads=4, batch=8, seq=64)
    model, params, x, _ = T.init(cfg)
    single = T.adapt(model, params, x, rank=8)
    layout = lora_jax.layout_of(lambda p, x: model.apply({"params": p}, x), params, x)
    stacked = lora_jax.stack(adapters(params, (8,) * 8, layout=layout))
    fwd = lora_jax.wrap(lambda p, x: model.apply({"params": p}, x), strict=True)
    ids = jnp.arange(8) % 8
    one = jax.jit(fwd).lower(single, x).compile()
    mixed = jax.jit(lambda p, x, ids: fwd(p, x, lora_adapter_ids=ids)).lower(stacked, x, ids).compile()
    ratio = mixed.cost_analysis()["flops"] / one.cost_analysis()["flops"]
    print(f"mixed batch of 8 adapters / one adapter forward FLOPs: {ratio:.4f}")
    assert ratio <= 1.10
    kernels = {tuple(n.w.shape) for n in jax.tree.leaves(single, is_leaf=lora_jax.is_lora)
               if lora_jax.is_lora(n)}
    per_adapter = {(8,) + k for k in kernels} | {(cfg.batch,) + k for k in kernels}
    text = jax.jit(lambda p, x, ids: fwd(p, x, lora_adapter_ids=ids)).lower(stacked, x, ids).as_text()

    shapes = {tuple(int(d) for d in m.split("x")) for m in re.findall(r"tensor<([0-9x]+)xf32>", text)}
    assert not shapes & per_adapter, shapes & per_adapter


# ------------------------------------------------------------------------------------------------
# K adapters trained in one step


def _model():
    cfg = T.Config(layers=2, d_model=32, d_ff=64, heads=2, batch=4, seq=6, scan=True)
    return T.init(cfg, seed=3)


OPTIMIZERS = {
    "lora": lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01)),
    "lora-pro": lambda lr: optax.chain(optax.clip_by_global_norm(1.0), lora_jax.lora_pro(),
                                       optax.adamw(lr, weight_decay=0.01)),
    "lora-pro-adamw": lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                                             lora_jax.lora_pro_adamw(lr, weight_decay=0.01)),
}


@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_k_adapters_in_one_vmapped_step_equal_k_separate_runs(method):
    model, params, x, y = _model()
    layout = lora_jax.layout_of(lambda p, x: model.apply({"params": p}, x), params, x)
    K, steps = 3, 20
    lrs = jnp.asarray([3e-3, 1e-2, 3e-2])
    singles = [lora_jax.apply(params, rank=4, layout=layout, key=jax.random.key(10 + k)) for k in range(K)]
    halves = [lora_jax.split(t)[0] for t in singles]
    frozen = lora_jax.split(singles[0])[1]
    data = jax.random.normal(jax.random.key(5), (steps, K) + x.shape)  # each adapter its own batches
    loss_fn = lora_jax.wrap(T.loss_fn(model))
    make = OPTIMIZERS[method]

    def one(t, s, batch, lr):
        loss, g = jax.value_and_grad(lambda t: loss_fn(lora_jax.combine(t, frozen), batch, y))(t)
        u, s = make(lr).update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    train = jax.tree.map(lambda *v: jnp.stack(v), *halves)
    state = jax.vmap(lambda t, lr: make(lr).init(t))(train, lrs)
    many = jax.jit(jax.vmap(one))
    for i in range(steps):
        train, state, losses = many(train, state, data[i], lrs)

    single_step = jax.jit(one)
    for k in range(K):
        t, s = halves[k], make(lrs[k]).init(halves[k])
        for i in range(steps):
            t, s, loss = single_step(t, s, data[i, k], lrs[k])
        got = jax.tree.map(lambda v: v[k], train)
        err = rel(np.concatenate([np.ravel(v) for v in jax.tree.leaves(got)]),
                  np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)]))
        moved = rel(np.concatenate([np.ravel(v) for v in jax.tree.leaves(halves[k])]),
                    np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)]))
        print(f"{method} adapter {k}: stacked vs alone after {steps} steps {err:.2e} (moved {moved:.2e})")
        assert err <= 1e-5 and moved > 1e-2
        assert abs(float(losses[k]) - float(loss)) <= 1e-5 * abs(float(loss))
    # the trained adapters serve as one stacked tree
    served = lora_jax.stack([lora_jax.combine(jax.tree.map(lambda v: v[k], train), frozen) for k in range(K)])
    assert lora_jax.num_adapters(served) == K


def test_padded_ranks_give_zero_gradients_to_the_padding_and_lora_pro_keeps_it_zero():
    model, params, x, y = _model()
    layout = lora_jax.layout_of(lambda p, x: model.apply({"params": p}, x), params, x)
    small = randomize_adapters(lora_jax.apply(params, rank=2, alpha=4, layout=layout, key=jax.random.key(1)),
                               jax.random.key(2), 0.3)
    big = lora_jax.apply(params, rank=4, alpha=8, layout=layout, key=jax.random.key(3))
    padded = lora_jax.unstack(lora_jax.stack([small, big], pad_ranks=True))[0]
    loss_fn = lora_jax.wrap(T.loss_fn(model))
    opt = optax.chain(lora_jax.lora_pro(), optax.adam(1e-2))

    def run(tree, n):
        t, f = lora_jax.split(tree)
        s = opt.init(t)
        for _ in range(n):
            g = jax.grad(lambda t: loss_fn(lora_jax.combine(t, f), x, y))(t)
            u, s = opt.update(g, s, t)
            t = optax.apply_updates(t, u)
        return t, g

    t_pad, g_pad = run(padded, 5)
    t_ref, _ = run(small, 5)
    def b_rows(node, lo, hi):  # b's rank axis comes after the batch axes
        return jax.lax.slice_in_dim(node.b, lo, hi, axis=node.a.ndim - 1 - node.roles.count("i"))

    nodes = [[n for n in jax.tree.leaves(v, is_leaf=lora_jax.is_lora) if lora_jax.is_lora(n)]
             for v in (g_pad, t_pad, t_ref)]
    worst = 0.0
    for gp, tp, tr in zip(*nodes):
        assert gp.a.shape[-1] == 4
        assert float(jnp.abs(gp.a[..., 2:]).max()) == 0 and float(jnp.abs(b_rows(gp, 2, 4)).max()) == 0
        assert float(jnp.abs(tp.a[..., 2:]).max()) == 0 and float(jnp.abs(b_rows(tp, 2, 4)).max()) == 0
        worst = max(worst, rel(tp.a[..., :2], tr.a), rel(b_rows(tp, 0, 2), tr.b))
    print(f"LoRA-Pro on rank 2 padded to 4, 5 steps: padding stays 0, the rest {worst:.2e} from unpadded")
    assert worst <= 1e-5


# ------------------------------------------------------------------------------------------------
# errors


def test_stack_names_the_first_mismatch_and_stacked_nodes_refuse_what_they_cannot_do():
    params = {"l1": {"kernel": jnp.ones((6, 5))}, "emb": {"embedding": jnp.ones((10, 6))}}
    both = "l1|emb"
    a, b = adapters(params, (2, 2), targets=both)
    with pytest.raises(ValueError, match="ranks"):
        lora_jax.stack(adapters(params, (2, 3), targets=both))
    with pytest.raises(ValueError, match="scale"):
        lora_jax.stack([a, lora_jax.apply(params, rank=2, alpha=8, targets=both)])
    other = {**params, "l1": {"kernel": params["l1"]["kernel"] + 1}}
    with pytest.raises(ValueError, match="frozen weight at 'l1/kernel'"):
        lora_jax.stack([a, lora_jax.apply(other, rank=2, alpha=4, targets=both)])
    with pytest.raises(ValueError, match="emb/embedding"):  # a plain leaf that differs
        lora_jax.stack([a, {**a, "emb": {"embedding": params["emb"]["embedding"] + 1}}])
    with pytest.raises(ValueError, match="'emb/embedding' is a LoRA node in tree 0 but not in tree 1"):
        lora_jax.stack([a, lora_jax.apply(params, rank=2, alpha=4, targets="l1")])
    with pytest.raises(ValueError, match="structure"):
        lora_jax.stack([a, {"l1": a["l1"]}])
    stacked = lora_jax.stack([a, b])
    f = lora_jax.wrap(lambda p, x: x @ p["l1"]["kernel"])
    with pytest.raises(ValueError, match="lora_adapter_ids"):
        f(stacked, jnp.ones((3, 6)))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        f(stacked, jnp.ones((3, 6)), lora_adapter_ids=jnp.asarray([0, 2, 1]))
    with pytest.raises(ValueError, match="leading axis is the batch"):
        f(stacked, jnp.ones((4, 6)), lora_adapter_ids=jnp.asarray([0, 1, 1]))
    with pytest.raises(ValueError, match="no single merged weight"):
        lora_jax.merge(stacked)
    with pytest.raises(ValueError, match="no single merged weight"):  # a lookup has no per-row rule
        lora_jax.wrap(lambda p, i: p["emb"]["embedding"][i])(stacked, jnp.asarray([1, 2]),
                                                              lora_adapter_ids=jnp.asarray([0, 1]))
    back = lora_jax.unstack(stacked)
    assert all(rel(u["l1"]["kernel"].a, v["l1"]["kernel"].a) == 0 for u, v in zip(back, (a, b)))
    with pytest.raises(ValueError, match="no LoRA node holds stacked adapters"):
        f(a, jnp.ones((3, 6)), lora_adapter_ids=jnp.asarray([0, 0, 0]))
