"""FSDP on 8 devices: per-device bytes of the frozen weights and of LoRA-Pro AdamW's moments, the
compiled step's memory, its all-gathers, and adapters split like their weights vs replicated.

    python -m bench.fsdp_memory                 # all-MiniLM-L6-v2, batch 16 x 64, 8 forced CPU devices
    python -m bench.fsdp_memory --model DIR --mesh data=4,fsdp=2 --rounds 5

Builds `train.classify`'s LoRA-Pro AdamW step (`train.parallel`) on one device and on the mesh and
prints, per layout: bytes of the frozen kernels/tables, of the moments and of the adapters on device 0
against their totals (read from the arrays' shards), `memory_analysis()` of the compiled step
(arguments, temporaries), its all-gathers whose result has a frozen weight's shape (any axis
order), and the median step time over `--rounds` (forced CPU devices share the host's cores:
times compare layouts, they do not show a speed-up).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def shard_bytes(leaves) -> tuple[int, int]:
    import jax

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


def measure(model_dir: Path, mesh: str | None, adapters: str, batch: int, seq: int, rounds: int) -> dict:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from train import classify, parallel

    argv = ["--model", str(model_dir), "--method", "lora-pro-adamw", "--batch-size", str(batch),
            "--max-len", str(seq), "--dropout", "0"] + (["--mesh", mesh] if mesh else [])
    args = classify.parse_args(argv)
    par = parallel.from_args(args)
    setup = classify.build(args, model_dir, 2, par)
    tr = setup.trainable
    state = par.on_devices(setup.optimizer.init(tr))  # moments split like their weights (from the factors)
    if adapters == "replicated" and par.kind == "mesh":  # the alternative: whole factors on every device
        tr = jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(par.mesh, P())), tr)
    step, _ = classify.make_steps(setup, args.method, None, par)
    rng = np.random.default_rng(0)
    rows = {"input_ids": rng.integers(1000, 2000, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32), "token_type_ids": np.zeros((batch, seq), np.int32),
            "label": rng.integers(0, 2, batch).astype(np.int32)}
    b = par.batch(rows)
    key = jax.random.key(0)
    compiled = step.lower(tr, state, setup.frozen, b, key).compile()
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    frozen = jax.tree_util.tree_leaves(setup.frozen)
    weights = [x for x in frozen if x.ndim >= 2]
    shapes = {tuple(sorted(x.shape)) for x in weights}
    gathers = [shape for shape, _ in all_gathers(hlo)]
    moments = shard_bytes([m for m in jax.tree_util.tree_leaves((state.mu, state.nu)) if m.ndim >= 2])
    ad = shard_bytes([x for x in jax.tree_util.tree_leaves(tr) if x.ndim >= 2])
    times = []  # (the step donates tr and state: read their bytes first)
    for _ in range(rounds + 1 if rounds else 0):
        t0 = time.perf_counter()
        tr, state, loss = compiled(tr, state, setup.frozen, b, key)
        float(loss)
        times.append(time.perf_counter() - t0)
    return {
        "layout": par.describe(), "adapters": adapters if par.kind == "mesh" else "-",
        "frozen_weights": shard_bytes(weights), "frozen_all": shard_bytes(frozen), "moments": moments,
        "adapters_bytes": ad, "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes, "all_gathers": len(gathers),
        "weight_shaped_gathers": sorted({g for g in gathers if tuple(sorted(g)) in shapes}),
        "all_reduces": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start("),
        "step_ms": 1e3 * float(np.median(times[1:])) if rounds else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="minilm or a HF BERT-family directory")
    p.add_argument("--mesh", default="fsdp=8")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None, help="append the records to this JSONL file")
    a = p.parse_args(argv)
    import jax

    from train import classify

    model_dir = classify.resolve_model(a.model)
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; model {model_dir.name}; "
          f"batch {a.batch} x {a.seq}; LoRA-Pro AdamW, rank 8, default targets")
    recs = [measure(model_dir, None, "-", a.batch, a.seq, a.rounds)]
    for adapters in ("sharded", "replicated"):
        recs.append(measure(model_dir, a.mesh, adapters, a.batch, a.seq, a.rounds))
    mb = 1e6
    print(f"{'layout':46s} {'adapters':10s} {'frozen kernels dev0/total MB':>29s} {'moments dev0/total MB':>22s} "
          f"{'args MB':>8s} {'temp MB':>8s} {'gathers':>7s} {'w-shaped':>8s} {'ms/step':>8s}")
    for r in recs:
        fw, mo = r["frozen_weights"], r["moments"]
        print(f"{r['layout']:46s} {r['adapters']:10s} {fw[0] / mb:12.2f} / {fw[1] / mb:7.2f} ({fw[0] / fw[1]:.3f})"
              f" {mo[0] / mb:8.2f} / {mo[1] / mb:6.2f} ({mo[0] / mo[1]:.3f}) {r['argument_bytes'] / mb:8.2f} "
              f"{r['temp_bytes'] / mb:8.2f} {r['all_gathers']:7d} {len(r['weight_shaped_gathers']):8d} {r['step_ms']:8.1f}")
    for r in recs[1:]:
        if r["weight_shaped_gathers"]:
            print(f"  {r['adapters']}: all-gathers of a frozen weight's shape: {r['weight_shaped_gathers']}")
    if a.json:
        with open(a.json, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
