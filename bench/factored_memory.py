"""Temp bytes, FLOPs and wall-clock of the benchmark transformer's train step, side by side.

Steps: full fine-tuning (grad wrt every parameter), frozen (grad wrt the input `x` only, the
backward pass any method must run) and LoRA rank 8 (grad wrt the adapters, `lora_jax.wrap`), each
unrolled and with ``Config(scan=True)``. Figures come from XLA's own analyses of the compiled steps;
wall-clock medians come from interleaved repeats (one call of each step per round), so load on a
shared machine hits all steps alike.

    python -m bench.factored_memory [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

import lora_jax
from bench import transformer as T


def steps(scan: bool):
    """{name: (compiled step, args)} for one model layout."""
    model, params, x, y = T.init(T.Config(scan=scan))
    trainable, frozen = lora_jax.split(lora_jax.apply(params, rank=8))
    loss = T.loss_fn(model)
    frozen_step = jax.value_and_grad(lambda x, p, y: loss(p, x, y))
    out = {}
    for name, fn, args in [("full", T.full_step(model), (params, x, y)),
                           ("frozen", frozen_step, (x, params, y)),
                           ("lora", T.lora_step(model), (trainable, frozen, x, y))]:
        out[name] = jax.jit(fn).lower(*args).compile(), args
    return out


def block(tree):
    return jax.block_until_ready(tree)


def main(rounds: int):
    rows = []
    for scan in (False, True):
        compiled = steps(scan)
        times = {name: [] for name in compiled}
        for fn, args in compiled.values():  # warm-up
            block(fn(*args))
        for _ in range(rounds):
            for name, (fn, args) in compiled.items():
                t0 = time.perf_counter()
                block(fn(*args))
                times[name].append(time.perf_counter() - t0)
        full_temp = compiled["full"][0].memory_analysis().temp_size_in_bytes
        full_flops = compiled["full"][0].cost_analysis()["flops"]
        full_ms = statistics.median(times["full"]) * 1e3
        frozen_ms = statistics.median(times["frozen"]) * 1e3
        for name, (fn, _) in compiled.items():
            temp = fn.memory_analysis().temp_size_in_bytes
            flops = fn.cost_analysis()["flops"]
            ms = statistics.median(times[name]) * 1e3
            rows.append((("scan" if scan else "unrolled"), name, temp / 1e6, temp / full_temp,
                         flops / 1e9, flops / full_flops, ms, ms / full_ms, ms / frozen_ms))
    print(f"{'layout':9} {'step':7} {'temp MB':>8} {'/full':>6} {'GFLOP':>7} {'/full':>6} "
          f"{'ms':>7} {'/full':>6} {'/frozen':>7}")
    for r in rows:
        print(f"{r[0]:9} {r[1]:7} {r[2]:8.1f} {r[3]:6.3f} {r[4]:7.1f} {r[5]:6.3f} "
              f"{r[6]:7.1f} {r[7]:6.3f} {r[8]:7.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    main(parser.parse_args().rounds)
