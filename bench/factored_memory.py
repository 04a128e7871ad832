"""Temp bytes, FLOPs and wall-clock of the benchmark transformer's train step, side by side.

Steps: full fine-tuning (grad wrt every parameter), frozen (grad wrt the input `x` only, the
backward pass any method must run) and LoRA rank 8 (grad wrt the adapters, `lora_jax.wrap`), each
unrolled and with ``Config(scan=True)``, each compiled under XLA:CPU's two schedulers: its default
(concurrency-optimised: it runs independent ops side by side and keeps more buffers live) and
``CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`` (a memory-minimising order, as accelerator backends use).
Figures come from XLA's own analyses of the compiled steps; wall-clock medians come from
interleaved rounds (`support.timing`: one call of each step per round), so load on a shared
machine hits all steps alike. Also printed: activation bytes the backward pass keeps (JAX's saved
residuals, weights excluded), which no scheduler changes.

    python -m bench.factored_memory [--rounds 15]
"""

from __future__ import annotations

import argparse

import jax

import lora_jax
from support import transformer as T
from support.probes import SCHEDULERS, activation_residual_bytes
from support.timing import interleave, timed


def steps(model, params, trainable, frozen, x, y):
    """{name: (step fn, args)} for one model layout."""
    loss = T.loss_fn(model)
    frozen_step = jax.value_and_grad(lambda x, p, y: loss(p, x, y))
    return {"full": (T.full_step(model), (params, x, y)),
            "frozen": (frozen_step, (x, params, y)),
            "lora": (T.lora_step(model), (trainable, frozen, x, y))}


def main(rounds: int):
    rows, residuals = [], []
    for scan in (False, True):
        layout = "scan" if scan else "unrolled"
        model, params, x, y = T.init(T.Config(scan=scan))
        trainable, frozen = lora_jax.split(T.adapt(model, params, x, rank=8))
        residuals.append((layout, *activation_residual_bytes(T.loss_fn(model), trainable, frozen,
                                                             params, x, y)))
        compiled = {(name, sched): (jax.jit(fn).lower(*args).compile(compiler_options=opts), args)
                    for name, (fn, args) in steps(model, params, trainable, frozen, x, y).items()
                    for sched, opts in SCHEDULERS.items()}
        timings = interleave({key: timed(lambda fn=fn, args=args: fn(*args))
                              for key, (fn, args) in compiled.items()}, rounds)
        for (name, sched), (fn, _) in compiled.items():
            full = compiled["full", sched][0]
            fm, m = full.memory_analysis(), fn.memory_analysis()
            live, full_live = (m.temp_size_in_bytes + m.output_size_in_bytes,
                               fm.temp_size_in_bytes + fm.output_size_in_bytes)
            ms = timings.median((name, sched)) * 1e3
            full_ms = timings.median(("full", sched)) * 1e3
            rows.append((layout, sched, name, m.temp_size_in_bytes / 1e6,
                         m.temp_size_in_bytes / fm.temp_size_in_bytes, live / full_live,
                         fn.cost_analysis()["flops"] / full.cost_analysis()["flops"], ms, ms / full_ms))
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
