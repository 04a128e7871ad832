"""Memory, FLOP and HLO probes of compiled steps, shared by the benchmarks and the tests.

* `SCHEDULERS`: XLA:CPU's two schedulers as ``compiler_options`` (its default, concurrency-
  optimised one, and the memory-minimising one accelerator backends use anyway).
* `activation_residual_bytes`: bytes of activations JAX keeps for the backward pass, full FT vs
  LoRA (weights excluded) — what no scheduler changes.
* `memory_of`, `flops`: XLA's own analyses of a compiled function.
* `shard_bytes`, `all_gathers`: bytes of arrays on device 0 against their totals, and the
  all-gathers of a compiled module's HLO text, for sharded steps.
"""

from __future__ import annotations

import re

import jax

import lora_jax
from lora_jax._compat import saved_residuals  # private in jax 0.10.2 (see lora_jax._compat)

SCHEDULERS = {"default": None,
              "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}
if jax.default_backend() != "cpu":  # accelerator backends schedule for memory already
    SCHEDULERS = {"default": None}


def activation_residual_bytes(loss, trainable, frozen, params, x, y):
    """Bytes of activations the backward pass keeps for ``loss(params, x, y)``: (full FT, LoRA
    through `lora_jax.wrap` with ``trainable`` differentiated). Weights are excluded."""
    lora_loss = lora_jax.wrap(loss)

    def total(res):
        return sum(a.size * a.dtype.itemsize for a, why in res
                   if not why.startswith(("from the argument", "from a constant")))
    full = total(saved_residuals(lambda p: loss(p, x, y), params))
    lora = total(saved_residuals(lambda t: lora_loss(lora_jax.combine(t, frozen), x, y), trainable))
    return full, lora


def memory_of(compiled) -> dict:
    """``memory_analysis()`` of a compiled function as a dict of byte counts ({} where the backend
    does not implement it)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}


def flops(compiled) -> float:
    """XLA's FLOP count of a compiled function (`cost_analysis` is a list on some versions)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", float("nan")))


def shard_bytes(leaves) -> tuple[int, int]:
    """(bytes on device 0, total bytes) of `leaves`, read from their shards."""
    dev0 = jax.devices()[0]
    on0 = total = 0
    for x in leaves:
        total += x.nbytes
        on0 += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev0)
    return on0, total


def all_gathers(hlo: str) -> list[tuple[tuple[int, ...], str]]:
    """(result shape, HLO line) of every all-gather in a compiled module's text."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", line)
        if m:
            out.append((tuple(int(d) for d in m.group(1).split(",") if d), line))
    return out
