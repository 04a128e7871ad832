"""Cost of LoRA-Pro's optimizers on the benchmark transformer (rank 8), against a plain LoRA step.

A "step" is the jitted train step: value_and_grad wrt the trainable half + optimizer update +
apply_updates. FLOPs are XLA's `compiled.cost_analysis()["flops"]`; wall-clock times are measured
side by side in one run (variants interleaved in every repeat by `support.timing`: medians, and
medians of the per-repeat ratios to the LoRA step).

    python -m bench.lora_pro_cost              # unstacked layers
    python -m bench.lora_pro_cost --scan       # scan-stacked layers (batched algebra)
"""

from __future__ import annotations

import argparse
import csv

import jax
import optax

import lora_jax
from support import transformer as tb
from support.probes import flops
from support.timing import interleave, timed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()

    cfg = tb.Config(scan=args.scan)
    model, params, x, y = tb.init(cfg)
    adapted = tb.adapt(model, params, x, rank=args.rank, alpha=2 * args.rank)
    trainable, frozen = lora_jax.split(adapted)
    vg = tb.lora_step(model)
    lr = 1e-4

    variants = {
        "LoRA adamw": optax.adamw(lr),
        "LoRA-Pro efficient: chain(lora_pro(), adamw)": optax.chain(lora_jax.lora_pro(), optax.adamw(lr)),
        "LoRA-Pro full: lora_pro_adamw": lora_jax.lora_pro_adamw(lr),
        "LoRA-Pro SGD: chain(lora_pro(), sgd)": optax.chain(lora_jax.lora_pro(), optax.sgd(lr)),
        "LoRA+ : loraplus(adamw)": lora_jax.loraplus(optax.adamw(lr)),
        "Riemannian: chain(riemannian(), adamw)": optax.chain(lora_jax.riemannian(), optax.adamw(lr)),
    }

    compiled, states = {}, {}
    for name, tx in variants.items():
        def train(t, s, frozen, x, y, tx=tx):
            loss, g = vg(t, frozen, x, y)
            u, s = tx.update(g, s, t)
            return optax.apply_updates(t, u), s, loss

        st = tx.init(trainable)
        compiled[name] = jax.jit(train).lower(trainable, st, frozen, x, y).compile()
        states[name] = st

    # full fine-tuning with adamw, for context
    full_vg = tb.full_step(model)
    full_tx = optax.adamw(lr)

    def full_train(p, s, x, y):
        loss, g = full_vg(p, x, y)
        u, s = full_tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    full_state = full_tx.init(params)
    full_c = jax.jit(full_train).lower(params, full_state, x, y).compile()

    runs = {name: (lambda c=c, st=states[name]: c(trainable, st, frozen, x, y))
            for name, c in compiled.items()}
    runs["full fine-tuning adamw"] = lambda: full_c(params, full_state, x, y)
    fl = {name: flops(c) for name, c in compiled.items()}
    fl["full fine-tuning adamw"] = flops(full_c)

    timings = interleave({name: timed(f) for name, f in runs.items()}, args.repeats)
    base = "LoRA adamw"
    med, ratio = timings.medians(), timings.ratios(base)
    dev = jax.devices()[0]
    print(f"# device: {dev.platform} {dev.device_kind}; cfg: {cfg}; rank {args.rank}; "
          f"repeats {args.repeats}; jax {jax.__version__}")
    print("| step | GFLOP | FLOPs / LoRA | median ms | time / LoRA (median of per-repeat ratios) |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for k in runs:
        print(f"| {k} | {fl[k] / 1e9:.3f} | {fl[k] / fl[base]:.4f} | {med[k] * 1e3:.1f} | {ratio[k]:.3f} |")
        rows.append([k, fl[k], fl[k] / fl[base], med[k], ratio[k]])
    # state sizes (bytes), to show what each optimizer keeps
    print()
    for name, st in states.items():
        nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(st))
        print(f"optimizer state, {name}: {nbytes / 2**20:.2f} MiB")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "flops", "flops_ratio", "median_s", "time_ratio"])
            w.writerows(rows)


if __name__ == "__main__":
    main()
