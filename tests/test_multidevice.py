"""A LoRA train step on 8 (forced CPU) devices: data-parallel and with a sharded frozen kernel."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import warnings
    import lora_jax
    from support import transformer as T
    warnings.simplefilter("error", lora_jax.LoRAMaterializationWarning)

    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    cfg = T.Config(layers=2, d_model=64, d_ff=128, heads=4, batch=8, seq=16, scan=True)
    model, params, x, y = T.init(cfg)
    trainable, frozen = lora_jax.split(T.adapt(model, params, x, rank=4, init="gaussian"))
    opt = optax.chain(lora_jax.lora_pro(), optax.adamw(1e-2))
    step_fn = T.lora_step(model)

    def train_step(trainable, state, frozen, x, y):
        value, grads = step_fn(trainable, frozen, x, y)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    # reference: one device
    state = opt.init(trainable)
    ref_t, _, ref_v = jax.jit(train_step)(trainable, state, frozen, x, y)

    # 8 devices: batch over "data"; FFN kernels (and their b factors) split over "model"
    def shard_frozen(path, leaf):
        name = jax.tree_util.keystr(path)
        spec = P(None, None, "model") if ("ffn_in" in name and leaf.ndim == 3) else P()
        return jax.device_put(leaf, NamedSharding(mesh, spec))
    frozen_s = jax.tree_util.tree_map_with_path(shard_frozen, frozen)
    x_s = jax.device_put(x, NamedSharding(mesh, P("data")))
    y_s = jax.device_put(y, NamedSharding(mesh, P("data")))
    trainable_s = jax.device_put(trainable, NamedSharding(mesh, P()))
    state_s = opt.init(trainable_s)
    step = jax.jit(train_step)
    new_t, _, value = step(trainable_s, state_s, frozen_s, x_s, y_s)
    np.testing.assert_allclose(value, ref_v, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_t), jax.tree.leaves(ref_t)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    hlo = step.lower(trainable_s, state_s, frozen_s, x_s, y_s).compile().as_text()
    assert "all-reduce" in hlo  # gradients are reduced across the data axis
    print("OK", float(value))
""")


def test_lora_pro_step_on_8_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


SHARDINGS = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import lora_jax
    from lora_jax.factor_pairs import full_shape as _full_shape

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    def put(x, *spec):
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))
    rng = np.random.default_rng(0)
    params = {
        "dense": put(rng.normal(size=(16, 8)).astype(np.float32), "fsdp", None),       # io, in split
        "stack": put(rng.normal(size=(3, 16, 8)).astype(np.float32), None, None, "fsdp"),  # scan-stacked, out split
        "query": put(rng.normal(size=(16, 4, 2)).astype(np.float32), "fsdp", None, None),  # DenseGeneral ioo
        "out": put(rng.normal(size=(4, 2, 16)).astype(np.float32), None, None, "fsdp"),    # iio
    }
    layout = {"dense": "io", "stack": "io", "query": "ioo", "out": "iio"}
    adapted = lora_jax.apply(params, 2, layout=layout, init="gaussian", key=jax.random.key(1))
    want = {"dense": (P("fsdp", None), P(None, None)), "stack": (P(None, None, None), P(None, None, "fsdp")),
            "query": (P("fsdp", None), P(None, None, None)), "out": (P(None, None, None), P(None, "fsdp"))}
    for k, (sa, sb) in want.items():
        node = adapted[k]
        assert node.a.sharding.spec == sa and node.b.sharding.spec == sb, (k, node.a.sharding, node.b.sharding)
        assert node.w.sharding == params[k].sharding  # w untouched
    # DoRA's magnitudes (w's batch and out axes) are split like w's output axes
    dora = lora_jax.apply(params, 2, layout=layout, init="gaussian", key=jax.random.key(1), dora=True)
    mags = {"dense": P(None), "stack": P(None, "fsdp"), "query": P(None, None), "out": P("fsdp")}
    for k, spec in mags.items():
        m = dora[k].m
        pad = lambda sp: tuple(sp) + (None,) * (m.ndim - len(sp))
        assert pad(m.sharding.spec) == pad(spec), (k, m.sharding)
        np.testing.assert_allclose(m, np.asarray(dora[k].weight_norm()), rtol=1e-6)
    # give b nonzero values so merge has something to add
    adapted = {k: lora_jax.LoRA(w=n.w, a=n.a, b=n.b + 0.1, scale=n.scale, roles=n.roles) for k, n in adapted.items()}
    tr, fr = lora_jax.split(adapted)
    back = lora_jax.combine(tr, fr)
    for k in params:
        assert back[k].a.sharding == adapted[k].a.sharding and back[k].w.sharding == params[k].sharding
        merged = lora_jax.merge(back)[k]
        assert merged.sharding.spec == params[k].sharding.spec, (k, merged.sharding)
        np.testing.assert_allclose(merged, np.asarray(params[k]) + np.asarray(adapted[k].delta()), rtol=1e-5, atol=1e-6)
    # LoRA-Pro AdamW's moments (kept as (*batch, I, O)) are split like w
    state = lora_jax.lora_pro_adamw(1e-3).init(tr)
    state, = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, lora_jax.LoraProAdamWState))
              if isinstance(x, lora_jax.LoraProAdamWState)]
    moments = {"dense": P("fsdp", None), "stack": P(None, None, "fsdp"), "query": P("fsdp", None),
               "out": P(None, "fsdp")}
    for k, spec in moments.items():
        assert state.mu[k].sharding.spec == spec and state.nu[k].sharding.spec == spec, (k, state.mu[k].sharding)
        assert state.mu[k].shape == _full_shape(tr[k])
    # a jitted step of either LoRA-Pro mode keeps every sharding and gathers no frozen weight
    x = put(rng.normal(size=(8, 16)).astype(np.float32), ("data", "fsdp"))
    fwd = lora_jax.wrap(lambda p, x: jnp.tanh(x @ p["dense"]).sum() + jnp.einsum("lio,bi->blo", p["stack"], x).sum()
                        + jnp.tanh(jnp.einsum("ihd,bi->bhd", p["query"], x)).sum()
                        + jnp.einsum("hdo,bo->bhd", p["out"], x).sum())
    for opt in (optax.chain(lora_jax.lora_pro(), optax.adam(1e-2)), lora_jax.lora_pro_adamw(1e-2)):
        st = opt.init(tr)  # the step count is made on one device: replicate it on the mesh
        st = jax.tree.map(lambda a: a if isinstance(a.sharding, NamedSharding) else put(a), st)
        def step(tr, st, fr, x):
            g = jax.grad(lambda t: fwd(lora_jax.combine(t, fr), x))(tr)
            u, st = opt.update(g, st, tr)
            return optax.apply_updates(tr, u), st
        shardings = jax.tree.map(lambda a: a.sharding, (tr, st))
        step = jax.jit(step, out_shardings=shardings)
        new_tr, new_st = step(tr, st, fr, x)
        assert jax.tree.map(lambda a: a.sharding, (new_tr, new_st)) == shardings
        hlo = step.lower(tr, st, fr, x).compile().as_text()
        # FSDP may gather a weight for the product that uses it (XLA's choice at this tiny batch:
        # cheaper than moving activations); never for anything else (the optimizer, a materialised w)
        import re
        from support.probes import all_gathers
        shapes = {tuple(sorted(v.shape)) for v in params.values()}
        for shape, line in all_gathers(hlo):
            if tuple(sorted(shape)) in shapes:
                assert re.search(r'op_name="[^"]*dot_general"', line), f"a frozen weight gathered outside its product: {line}"
    print("OK")
""")


def test_library_keeps_shardings():
    """apply creates factors (and DoRA magnitudes) split like their weight (every role layout, stacked axes too); split,
    combine and merge keep shardings; LoRA-Pro AdamW's moments are split like w; jitted LoRA-Pro
    steps (both modes) keep every sharding and all-gather a frozen weight only for its own product."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDINGS], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert "OK" in proc.stdout
