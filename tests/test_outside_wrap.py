"""A `LoRA` node used as an array outside `lora_jax.wrap` fails at once with one message that says
what to do, in Linen, Flax NNX and plain functions, instead of deep inside the caller."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax

KEY = jax.random.key(0)
SAYS = r"lora_jax\.LoRA node \(weight \(12, 24\)\) was used as an array outside lora_jax\.wrap"


def test_linen_module_called_without_wrap():
    model = nn.Dense(24)
    x = jnp.ones((3, 12))
    adapted = lora_jax.apply(model.init(KEY, x)["params"], rank=4)
    with pytest.raises(TypeError, match=SAYS):
        model.apply({"params": adapted}, x)
    out = lora_jax.wrap(lambda p, x: model.apply({"params": p}, x))(adapted, x)  # the way it runs
    np.testing.assert_allclose(out, model.apply({"params": lora_jax.merge(adapted)}, x), rtol=1e-6)


def test_nnx_module_called_after_nnx_update_without_wrap():
    model = nnx.Linear(12, 24, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 12))
    graphdef, state = nnx.split(model)
    adapted = lora_jax.apply(state, rank=4)
    nnx.update(model, adapted)
    with pytest.raises(TypeError, match=SAYS + r".*nnx\.split"):
        model(x)
    out = lora_jax.wrap(lambda st, x: nnx.merge(graphdef, st)(x))(adapted, x)  # as the message says
    want = nnx.merge(graphdef, lora_jax.merge(adapted))(x)
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("use", ["matmul", "jnp.dot", "jnp.asarray", "np.asarray", "jit"])
def test_plain_functions_without_wrap(use):
    node = lora_jax.apply({"k": jnp.ones((12, 24))}, rank=4)["k"]
    x = jnp.ones((3, 12))
    call = {"matmul": lambda: x @ node, "jnp.dot": lambda: jnp.dot(x, node),
            "jnp.asarray": lambda: jnp.asarray(node), "np.asarray": lambda: np.asarray(node),
            "jit": lambda: jax.jit(lambda k: x @ k)(node)}[use]
    with pytest.raises(TypeError, match=SAYS):
        call()


def test_inside_wrap_the_node_is_no_array_like():
    """Inside `wrap`, quax must see a value to dispatch on, not an array-like."""
    import equinox as eqx

    node = lora_jax.apply({"k": jnp.ones((12, 24))}, rank=4)["k"]
    assert eqx.is_array_like(node)  # outside: jax.numpy would coerce it (and be refused)
    seen = []
    lora_jax.wrap(lambda k: seen.append(eqx.is_array_like(node)) or jnp.ones((2, 12)) @ k)(node)
    assert seen == [False]
