"""FSDP on 8 devices: per-device bytes of the frozen weights and of LoRA-Pro AdamW's moments, the
compiled step's memory, its all-gathers, and adapters split like their weights vs replicated.

    python -m bench.fsdp_memory                 # all-MiniLM-L6-v2, batch 16 x 64, 8 forced CPU devices
    python -m bench.fsdp_memory --model DIR --mesh data=4,fsdp=2 --rounds 5

Builds `train.classify`'s LoRA-Pro AdamW step (`train.parallel`) on one device and on the mesh
(`support.fsdp.measure`) and prints, per layout: bytes of the frozen kernels/tables, of the
moments and of the adapters on device 0 against their totals (read from the arrays' shards),
`memory_analysis()` of the compiled step (arguments, temporaries), its all-gathers whose result has
a frozen weight's shape (any axis order), and the median step time over `--rounds` (forced CPU
devices share the host's cores: times compare layouts, they do not show a speed-up).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

from support.fsdp import measure  # noqa: E402
from train import classify  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="minilm or a HF BERT-family directory")
    p.add_argument("--mesh", default="fsdp=8")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None, help="append the records to this JSONL file")
    a = p.parse_args(argv)
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
