"""One FSDP measurement of `train.classify`'s LoRA-Pro AdamW step, shared by bench/fsdp_memory.py
and tests/test_parallel.py: per-device bytes of the frozen weights, the moments and the adapters
(read from the arrays' shards), the compiled step's `memory_analysis()`, its all-gathers (those
whose result has a frozen weight's shape, in any axis order, listed apart) and its step time."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from support.probes import all_gathers, shard_bytes
from support.timing import interleave
from train import classify, parallel


def measure(model_dir: Path, mesh: str | None, adapters: str, batch: int, seq: int, rounds: int) -> dict:
    """`adapters`: "sharded" (split like their weights, the default) or "replicated" (whole
    factors on every device); `mesh` None is one device. `rounds` 0: no timing."""
    argv = ["--model", str(model_dir), "--method", "lora-pro-adamw", "--batch-size", str(batch),
            "--max-len", str(seq), "--dropout", "0"] + (["--mesh", mesh] if mesh else [])
    args = classify.parse_args(argv)
    par = parallel.from_args(args)
    setup = classify.build(args, model_dir, 2, par)
    tr = setup.trainable
    state = par.on_devices(setup.optimizer.init(tr))  # moments split like their weights (from the factors)
    if adapters == "replicated" and par.kind == "mesh":
        tr = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(par.mesh, P())), tr)
    step, _ = classify.make_steps(setup, args.method, par=par)
    rng = np.random.default_rng(0)
    rows = {"input_ids": rng.integers(1000, 2000, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32), "token_type_ids": np.zeros((batch, seq), np.int32),
            "label": rng.integers(0, 2, batch).astype(np.int32)}
    b = par.batch(rows)
    key = jax.random.key(0)
    compiled = step.lower(tr, state, setup.frozen, b, key).compile()
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    frozen = jax.tree.leaves(setup.frozen)
    weights = [x for x in frozen if x.ndim >= 2]
    shapes = {tuple(sorted(x.shape)) for x in weights}
    gathers = [shape for shape, _ in all_gathers(hlo)]
    # the step donates tr and state: read their bytes before timing it
    moments = shard_bytes([m for m in jax.tree.leaves(state) if m.ndim >= 2])  # Adam's moments
    ad = shard_bytes([x for x in jax.tree.leaves(tr) if x.ndim >= 2])
    carry = {"tr": tr, "state": state}

    def one_step() -> float:
        t0 = time.perf_counter()
        carry["tr"], carry["state"], loss = compiled(carry["tr"], carry["state"], setup.frozen, b, key)
        float(loss)
        return time.perf_counter() - t0

    step_ms = 1e3 * interleave({"step": one_step}, rounds).median("step") if rounds else None
    return {
        "layout": par.describe(), "adapters": adapters if par.kind == "mesh" else "-",
        "frozen_weights": shard_bytes(weights), "frozen_all": shard_bytes(frozen), "moments": moments,
        "adapters_bytes": ad, "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes, "all_gathers": len(gathers),
        "weight_shaped_gathers": sorted({g for g in gathers if tuple(sorted(g)) in shapes}),
        "all_reduces": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start("),
        "step_ms": step_ms,
    }
