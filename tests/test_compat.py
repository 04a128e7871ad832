"""Each workaround in `lora_jax._compat` pins a behaviour of a dependency's pinned version. These
tests fail when that behaviour changes, which is the day to delete the workaround (and its test)."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
import lora_jax.product
from helpers import randomize_adapters
from lora_jax import _compat

KEY = jax.random.key(0)


def _unsqueezed(u, v, shape):
    """The multiply-reduce as it would be written without the workaround."""
    return (u * v).sum(-1).reshape(shape)


@pytest.mark.skipif(jax.default_backend() != "cpu"
                    or _compat.YNN_OFF in os.environ.get("XLA_FLAGS", ""),
                    reason="the miscompile is XLA:CPU's, with its YNNPACK fusion on")
def test_ynnpack_unit_axis_multiply_reduce_still_miscompiles(monkeypatch):
    """A Dense layer on a batch of one row, jitted: with `multiply_reduce_last`'s squeeze the
    factored product is exact; written plainly it is wrong by O(1) under XLA:CPU's YNNPACK fusion
    (jaxlib 0.10.2). If the plain form becomes exact, the squeeze (and `cpu_unit_rows_unsafe`'s
    refusal in train.parallel, which tests/test_parallel.py pins on 8 devices) can go."""
    x = jax.random.normal(KEY, (1, 8, 24))
    module = nn.Dense(64)
    tree = randomize_adapters(lora_jax.apply(module.init(KEY, x)["params"], rank=8), KEY)
    apply = lambda p, x: module.apply({"params": p}, x)
    want = np.asarray(apply(lora_jax.merge(tree), x))

    def err():
        return float(np.abs(np.asarray(jax.jit(lora_jax.wrap(apply))(tree, x)) - want).max())

    assert err() < 1e-4
    monkeypatch.setattr(lora_jax.product, "multiply_reduce_last", _unsqueezed)
    assert err() > 0.1, "the YNNPACK unit-axis miscompile is gone: drop the workaround"


def test_cpu_unit_rows_unsafe(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    assert _compat.cpu_unit_rows_unsafe("cpu", 1)
    assert not _compat.cpu_unit_rows_unsafe("cpu", 2)
    assert not _compat.cpu_unit_rows_unsafe("gpu", 1)
    monkeypatch.setenv("XLA_FLAGS", _compat.YNN_OFF)
    assert not _compat.cpu_unit_rows_unsafe("cpu", 1)


def test_saved_residuals_still_private():
    """jax has no public function returning the saved residuals (only one printing them); when it
    gains one, import that instead of `jax._src.ad_checkpoint.saved_residuals`."""
    assert not hasattr(jax.ad_checkpoint, "saved_residuals")
    res = _compat.saved_residuals(lambda x: jnp.sin(x).sum(), jnp.ones(3))
    assert [tuple(aval.shape) for aval, _ in res] == [(3,)]


def test_trace_context_still_private():
    """The trace context that the NNX emulation test patches is not public in jax.core; when it
    is, patch the public one."""
    assert not hasattr(jax.core, "TakeCurrentTraceContextManager")
    assert hasattr(_compat.jax_core, "TakeCurrentTraceContextManager")
    assert hasattr(_compat.jax_core.trace_ctx, "set_trace")


def test_quax_has_no_custom_vjp_rule():
    """quax 0.4.6: a `jax.custom_vjp` function called directly inside `wrap` raises
    NotImplementedError (README, "Limits"); through `jax.jit` it works. When the direct call works,
    lift the README's limit."""
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    params = lora_jax.apply({"w": jnp.ones((3, 4))}, rank=2, targets="w")
    x = jnp.ones((2, 3))
    with pytest.raises(NotImplementedError, match="custom_vjp"):
        lora_jax.wrap(lambda p, x: f(x @ p["w"]))(params, x)
    np.testing.assert_allclose(lora_jax.wrap(lambda p, x: jax.jit(f)(x @ p["w"]))(params, x),
                               jnp.sin(x @ jnp.ones((3, 4))), rtol=1e-6)
