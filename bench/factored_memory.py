"""Temp bytes, FLOPs and wall-clock of the benchmark transformer's train step, side by side.

Steps: full fine-tuning (grad wrt every parameter), frozen (grad wrt the input `x` only, the
backward pass any method must run) and LoRA rank 8 (grad wrt the adapters, `lora_jax.wrap`), each
unrolled and with ``Config(scan=True)``, each compiled under XLA:CPU's two schedulers: its default
(concurrency-optimised: it runs independent ops side by side and keeps more buffers live) and
``CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`` (a memory-minimising order, as accelerator backends use).
Figures come from XLA's own analyses of the compiled steps; wall-clock medians come from
interleaved repeats (one call of each step per round), so load on a shared machine hits all
steps alike. Also printed: activation bytes the backward pass keeps (JAX's saved residuals,
weights excluded), which no scheduler changes.

    python -m bench.factored_memory [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from jax._src.ad_checkpoint import saved_residuals

import lora_jax
from bench import transformer as T

SCHEDULERS = {"default": None,
              "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}
if jax.default_backend() != "cpu":  # accelerator backends schedule for memory already
    SCHEDULERS = {"default": None}


def steps(model, params, trainable, frozen, x, y):
    """{name: (step fn, args)} for one model layout."""
    loss = T.loss_fn(model)
    frozen_step = jax.value_and_grad(lambda x, p, y: loss(p, x, y))
    return {"full": (T.full_step(model), (params, x, y)),
            "frozen": (frozen_step, (x, params, y)),
            "lora": (T.lora_step(model), (trainable, frozen, x, y))}


def activation_residual_bytes(model, trainable, frozen, params, x, y):
    """Bytes of activations the backward pass keeps: (full FT, LoRA). Weights are excluded."""
    loss = T.loss_fn(model)
    lora_loss = lora_jax.wrap(loss)

    def total(res):
        return sum(a.size * a.dtype.itemsize for a, why in res
                   if not why.startswith(("from the argument", "from a constant")))
    full = total(saved_residuals(lambda p: loss(p, x, y), params))
    lora = total(saved_residuals(lambda t: lora_loss(lora_jax.combine(t, frozen), x, y), trainable))
    return full, lora


def block(tree):
    return jax.block_until_ready(tree)


def main(rounds: int):
    rows, residuals = [], []
    for scan in (False, True):
        model, params, x, y = T.init(T.Config(scan=scan))
        trainable, frozen = lora_jax.split(T.adapt(model, params, x, rank=8))
        residuals.append(("scan" if scan else "unrolled",
                          *activation_residual_bytes(model, trainable, frozen, params, x, y)))
        compiled = {(name, sched): (jax.jit(fn).lower(*args).compile(compiler_options=opts), args)
                    for name, (fn, args) in steps(model, params, trainable, frozen, x, y).items()
                    for sched, opts in SCHEDULERS.items()}
        times = {key: [] for key in compiled}
        for fn, args in compiled.values():  # warm-up
            block(fn(*args))
        for _ in range(rounds):
            for key, (fn, args) in compiled.items():
                t0 = time.perf_counter()
                block(fn(*args))
                times[key].append(time.perf_counter() - t0)
        for (name, sched), (fn, _) in compiled.items():
            full = compiled["full", sched][0]
            fm, m = full.memory_analysis(), fn.memory_analysis()
            live, full_live = (m.temp_size_in_bytes + m.output_size_in_bytes,
                               fm.temp_size_in_bytes + fm.output_size_in_bytes)
            flops = fn.cost_analysis()["flops"]
            ms = statistics.median(times[name, sched]) * 1e3
            full_ms = statistics.median(times["full", sched]) * 1e3
            rows.append(("scan" if scan else "unrolled", sched, name, m.temp_size_in_bytes / 1e6,
                         m.temp_size_in_bytes / fm.temp_size_in_bytes, live / full_live,
                         flops / full.cost_analysis()["flops"], ms, ms / full_ms))
    print(f"{'layout':9} {'sched':8} {'step':7} {'temp MB':>8} {'/full':>6} {'+out/full':>9} "
          f"{'FLOPs/full':>10} {'ms':>7} {'/full':>6}")
    for r in rows:
        print(f"{r[0]:9} {r[1]:8} {r[2]:7} {r[3]:8.1f} {r[4]:6.3f} {r[5]:9.3f} {r[6]:10.3f} "
              f"{r[7]:7.1f} {r[8]:6.3f}")
    print("\nactivation bytes kept for the backward pass (JAX saved residuals, weights excluded)")
    for layout, full, lora in residuals:
        print(f"{layout:9} full {full / 1e6:8.2f} MB  lora {lora / 1e6:8.2f} MB  lora/full {lora / full:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    main(parser.parse_args().rounds)
