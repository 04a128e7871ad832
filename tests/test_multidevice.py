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
    from bench import transformer as T
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
