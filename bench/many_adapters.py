"""Several adapters on one base: K adapters trained in one vmapped step against K steps one after
the other, and a mixed-adapter batch (`lora_jax.stack`, ``lora_adapter_ids``) against one
adapter's forward pass, on the benchmark transformer (`support.transformer`, rank 8, AdamW).

    python -m bench.many_adapters            # CPU, a reduced transformer (2 layers, d 256, 8×64 tokens)
    python -m bench.many_adapters --full     # the benchmark size (4 layers, d 512, 8×128 tokens)

Each adapter of the stacked step has its own batch of the benchmark's size, so the stacked step
does K times the work of one step: the figures say what one step for all costs against K steps.
FLOPs and temp bytes are XLA's (`cost_analysis`, `memory_analysis`); times are medians of rounds
interleaved by `support.timing` (so load falls on all contenders alike), ratios the medians of
the per-round ratios. Results: bench/results/many_adapters.json and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import lora_jax
from support import transformer as T
from support.probes import flops, memory_of
from support.runs import write_section
from support.timing import interleave, timed

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Many adapters on one base: K trained in one step, mixed-adapter batches"


def compile_steps(model, params, x, y, k: int):
    """(stacked step for k adapters, its arguments), (one adapter's step, its arguments)."""
    layout = lora_jax.layout_of(lambda p, x: model.apply({"params": p}, x), params, x)
    singles = [lora_jax.apply(params, rank=8, layout=layout, key=jax.random.key(i)) for i in range(k)]
    halves = [lora_jax.split(t)[0] for t in singles]
    frozen = lora_jax.split(singles[0])[1]
    loss_fn = lora_jax.wrap(T.loss_fn(model))

    def one(t, s, batch, lr):
        loss, g = jax.value_and_grad(lambda t: loss_fn(lora_jax.combine(t, frozen), batch, y))(t)
        u, s = optax.adamw(lr).update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    train = jax.tree.map(lambda *v: jnp.stack(v), *halves)
    state = jax.vmap(optax.adamw(1e-3).init)(train)
    batches = jnp.stack([x + 0.01 * i for i in range(k)])
    lrs = jnp.full((k,), 1e-3)
    many_args = (train, state, batches, lrs)
    one_args = (halves[0], optax.adamw(1e-3).init(halves[0]), x, jnp.float32(1e-3))
    many = jax.jit(jax.vmap(one)).lower(*many_args).compile()
    single = jax.jit(one).lower(*one_args).compile()
    return (many, many_args), (single, one_args), singles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the benchmark transformer's full size")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    cfg = T.Config() if a.full else T.Config(layers=2, d_model=256, d_ff=1024, heads=4, batch=8, seq=64)
    model, params, x, y = T.init(cfg)

    rows = []
    for k in a.ks:
        (many, many_args), (single, one_args), singles = compile_steps(model, params, x, y, k)
        contenders = {"stacked": timed(lambda: many(*many_args)),
                      "sequential": timed(lambda: [single(*one_args) for _ in range(k)])}
        t = interleave(contenders, a.rounds)
        rows.append({"k": k, "stacked_ms": 1e3 * t.median("stacked"), "sequential_ms": 1e3 * t.median("sequential"),
                     "time_ratio": t.ratio("stacked", "sequential"),
                     "flops_ratio": flops(many) / (k * flops(single)),
                     "stacked_temp_mb": memory_of(many).get("temp_bytes", 0) / 2 ** 20,
                     "single_temp_mb": memory_of(single).get("temp_bytes", 0) / 2 ** 20})
        print(json.dumps(rows[-1]))

    # mixed batch: 8 adapters, one row each (cycling), against one adapter on the same batch
    k = 8
    layout = lora_jax.layout_of(lambda p, x: model.apply({"params": p}, x), params, x)
    singles = [lora_jax.apply(params, rank=8, layout=layout, key=jax.random.key(i)) for i in range(k)]
    stacked = lora_jax.stack(singles)
    fwd = lora_jax.wrap(lambda p, x: model.apply({"params": p}, x), strict=True)
    ids = jnp.arange(cfg.batch, dtype=jnp.int32) % k
    mixed = jax.jit(lambda p, x, ids: fwd(p, x, lora_adapter_ids=ids)).lower(stacked, x, ids).compile()
    one = jax.jit(fwd).lower(singles[0], x).compile()
    t = interleave({"mixed": timed(lambda: mixed(stacked, x, ids)), "one": timed(lambda: one(singles[0], x))},
                   a.rounds * 3)
    forward = {"k": k, "mixed_ms": 1e3 * t.median("mixed"), "one_ms": 1e3 * t.median("one"),
               "time_ratio": t.ratio("mixed", "one"), "flops_ratio": flops(mixed) / flops(one),
               "mixed_temp_mb": memory_of(mixed).get("temp_bytes", 0) / 2 ** 20,
               "one_temp_mb": memory_of(one).get("temp_bytes", 0) / 2 ** 20}
    print(json.dumps(forward))

    meta = {"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "python": platform.python_version(),
            "config": {f: getattr(cfg, f) for f in ("layers", "d_model", "d_ff", "heads", "batch", "seq", "scan")},
            "rounds": a.rounds, "command": "python -m bench.many_adapters" + (" --full" if a.full else "")}
    text = report(rows, forward, meta)
    print(text)
    if not a.no_write:
        out = ROOT / "bench" / "results" / ("many_adapters_full.json" if a.full else "many_adapters.json")
        out.write_text(json.dumps({"meta": meta, "training": rows, "mixed_forward": forward}, indent=1) + "\n")
        write_section(ROOT / "bench" / "RESULTS.md", SECTION + (" (full size)" if a.full else ""), text)
    return 0


def report(rows, forward, meta) -> str:
    c = meta["config"]
    lines = [SECTION + (" (full size)" if "--full" in meta["command"] else ""), "",
             f"`{meta['command']}` — {meta['device']}, jax {meta['jax']}, {meta['date']}. Benchmark transformer "
             f"{c['layers']} layers, d_model {c['d_model']}, FFN {c['d_ff']}, batch {c['batch']}×{c['seq']} tokens "
             "(per adapter), LoRA rank 8 on q, k, v, o and both FFN kernels, AdamW. Times: medians of "
             f"{meta['rounds']} interleaved rounds; ratios: medians of per-round ratios.", "",
             "K adapters trained in one vmapped step (each its own batch, lr, optimizer state) against K "
             "single-adapter steps run one after the other:", "",
             "| K | one stacked step (ms) | K steps (ms) | time ratio | FLOPs ratio | temp MB stacked / one |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['stacked_ms']:.1f} | {r['sequential_ms']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['flops_ratio']:.3f} | {r['stacked_temp_mb']:.1f} / {r['single_temp_mb']:.1f} |")
    f = forward
    lines += ["", f"A mixed batch (row i uses adapter i mod {f['k']}, `lora_adapter_ids`) against one adapter's "
              "forward on the same batch:", "",
              "| forward | ms | FLOPs ratio | temp MB |", "|---|---|---|---|",
              f"| one adapter | {f['one_ms']:.2f} | 1 | {f['one_temp_mb']:.1f} |",
              f"| mixed, {f['k']} adapters | {f['mixed_ms']:.2f} | {f['flops_ratio']:.4f} | {f['mixed_temp_mb']:.1f} |",
              "", f"Mixed / one adapter time: **{f['time_ratio']:.2f}×**."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
