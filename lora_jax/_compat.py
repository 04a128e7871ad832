"""Workarounds for behaviour of the pinned versions of our dependencies, each in one place.

Every entry names the version it was found on and has a test in ``tests/test_compat.py`` that
fails once the behaviour it works around is gone, so the workaround can be deleted that day.

* XLA:CPU's YNNPACK fusion (jaxlib 0.10.2) miscompiles a multiply-reduce whose result has a unit
  axis (errors of order 1, e.g. LoRA's factored product on a batch of one row). The factored
  product squeezes unit axes away before its multiply-reduce (`multiply_reduce_last`); the trainers
  refuse a mesh with one row per CPU device (`cpu_unit_rows_unsafe`) — there the unit axis comes
  from GSPMD's partitioning, after our code — unless the fusion is off (`YNN_OFF` in `XLA_FLAGS`).
* jax 0.10.2 exposes `saved_residuals` (what a function's VJP keeps from its forward pass) only
  through `jax.ad_checkpoint.print_saved_residuals`, which prints instead of returning; the memory
  tests and probes need the list, so it is imported from ``jax._src`` here, and only here.
* jax 0.10.2 keeps the trace context (``trace_ctx``, ``TakeCurrentTraceContextManager``) private;
  the NNX test that emulates jax ≥ 0.11's ``None`` trace inside quax patches it (`jax_core`).
* quax 0.4.6 has no rule for ``custom_vjp_call``: a `jax.custom_vjp` function called directly
  inside a wrapped function raises `NotImplementedError`; called through `jax.jit` it works
  (`train/bert.py`'s cuDNN attention does so). Nothing to patch here; the test pins it so the
  README's limit can be lifted when quax adds the rule.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax._src import core as jax_core  # private: see the module docstring
from jax._src.ad_checkpoint import saved_residuals  # private: see the module docstring

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="  # XLA flag: XLA:CPU's YNNPACK fusions off


def multiply_reduce_last(u, v, shape):
    """``(u * v).sum(-1)`` reshaped to `shape` (the broadcast shape without the last axis), computed
    with the unit axes of `shape` squeezed out of both operands (YNNPACK unit-axis miscompile)."""
    unit = [d for d, n in enumerate(shape) if n == 1]
    return (jnp.squeeze(u, unit) * jnp.squeeze(v, unit)).sum(-1).reshape(shape)


def cpu_unit_rows_unsafe(platform: str, rows_per_device: int) -> bool:
    """True where a jitted step with `rows_per_device` rows per device would hit the YNNPACK
    unit-axis miscompile: on CPU, one row per device, the fusion not turned off."""
    return (platform == "cpu" and rows_per_device == 1
            and YNN_OFF not in os.environ.get("XLA_FLAGS", ""))


__all__ = ["YNN_OFF", "cpu_unit_rows_unsafe", "jax_core", "multiply_reduce_last", "saved_residuals"]
