"""Teacher–student: does LoRA-Pro follow full fine-tuning's loss curve more closely than LoRA?

Task. A frozen random 3-layer tanh MLP (the "pre-trained" W0); the teacher is the same network with
a random rank-2 update added to every weight; the student starts from W0 and regresses the teacher's
outputs on a fixed set of inputs (full batch, MSE). Full fine-tuning can reach ~0 loss; so can a
rank-4 adapter, in principle.

Methods (same steps, same learning-rate grids):
  SGD family:   full FT (sgd) | LoRA (sgd) | LoRA-Pro SGD = chain(lora_pro(), sgd)
  AdamW family: full FT (adamw) | LoRA (adamw) | LoRA-Pro efficient = chain(lora_pro(), adamw) |
                LoRA-Pro full = lora_pro_adamw
Metric: the distance of a method's curve to full FT's curve (same optimizer family, same lr) =
mean over steps of |log10 L_method − log10 L_full|; and final losses. A "best lr" summary compares
each method at its own best lr with full FT at its best lr.

    .venv/bin/python bench/lora_pro_behaviour.py     # writes bench/results/lora_pro_behaviour.{csv,png}
"""

from __future__ import annotations

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lora_jax  # noqa: E402

D_IN, D_H, D_OUT, N = 32, 64, 16, 1024
TEACHER_RANK, LORA_RANK, ALPHA = 2, 4, 8.0
STEPS = 400
SEEDS = (0, 1, 2)
SGD_LRS = (0.03, 0.1, 0.3, 1.0)
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
OUT = os.path.join(os.path.dirname(__file__), "results")


def problem(seed):
    ks = jax.random.split(jax.random.key(seed), 10)
    dims = [(D_IN, D_H), (D_H, D_H), (D_H, D_OUT)]
    w0 = {f"l{i}": {"kernel": jax.random.normal(ks[i], d) / np.sqrt(d[0])} for i, d in enumerate(dims)}
    teacher = {}
    for i, d in enumerate(dims):
        u = jax.random.normal(ks[3 + i], (d[0], TEACHER_RANK)) / np.sqrt(d[0])
        v = jax.random.normal(ks[6 + i], (TEACHER_RANK, d[1]))
        teacher[f"l{i}"] = {"kernel": w0[f"l{i}"]["kernel"] + 0.7 * u @ v}
    x = jax.random.normal(ks[9], (N, D_IN))
    y = forward(teacher, x)
    return w0, x, y


def forward(p, x):
    h = jnp.tanh(x @ p["l0"]["kernel"])
    h = jnp.tanh(h @ p["l1"]["kernel"])
    return h @ p["l2"]["kernel"]


def run_full(w0, x, y, tx):
    loss = lambda p: jnp.mean((forward(p, x) - y) ** 2)  # noqa: E731

    def step(c, _):
        p, s = c
        l, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), l

    return jax.lax.scan(step, (w0, tx.init(w0)), None, length=STEPS)[1]


def run_lora(w0, x, y, tx, seed):
    adapted = lora_jax.apply(w0, rank=LORA_RANK, alpha=ALPHA, key=jax.random.key(100 + seed))
    t, frozen = lora_jax.split(adapted)
    f = lora_jax.wrap(forward)
    loss = lambda t: jnp.mean((f(lora_jax.combine(t, frozen), x) - y) ** 2)  # noqa: E731

    def step(c, _):
        t, s = c
        l, g = jax.value_and_grad(loss)(t)
        u, s = tx.update(g, s, t)
        return (optax.apply_updates(t, u), s), l

    return jax.lax.scan(step, (t, tx.init(t)), None, length=STEPS)[1]


METHODS = {
    "sgd": {
        "full FT": lambda lr: ("full", optax.sgd(lr)),
        "LoRA": lambda lr: ("lora", optax.sgd(lr)),
        "LoRA-Pro SGD": lambda lr: ("lora", optax.chain(lora_jax.lora_pro(), optax.sgd(lr))),
    },
    "adamw": {
        "full FT": lambda lr: ("full", optax.adamw(lr, weight_decay=0.0)),
        "LoRA": lambda lr: ("lora", optax.adamw(lr, weight_decay=0.0)),
        "LoRA-Pro efficient": lambda lr: ("lora", optax.chain(lora_jax.lora_pro(),
                                                              optax.adamw(lr, weight_decay=0.0))),
        "LoRA-Pro full": lambda lr: ("lora", lora_jax.lora_pro_adamw(lr)),
    },
}


def curve(kind, tx, seed):
    w0, x, y = problem(seed)
    if kind == "full":
        return np.asarray(jax.jit(lambda: run_full(w0, x, y, tx))())
    return np.asarray(jax.jit(lambda: run_lora(w0, x, y, tx, seed))())


def dist(c, ref):
    return float(np.mean(np.abs(np.log10(np.maximum(c, 1e-12)) - np.log10(np.maximum(ref, 1e-12)))))


def main():
    os.makedirs(OUT, exist_ok=True)
    curves = {}  # (family, method, lr) -> mean-over-seeds curve (geometric mean)
    for family, lrs in (("sgd", SGD_LRS), ("adamw", ADAM_LRS)):
        for method, make in METHODS[family].items():
            for lr in lrs:
                cs = []
                for seed in SEEDS:
                    kind, tx = make(lr)
                    cs.append(curve(kind, tx, seed))
                cs = np.stack(cs)
                if not np.all(np.isfinite(cs)):
                    cs = np.where(np.isfinite(cs), cs, 1e3)
                curves[(family, method, lr)] = np.exp(np.mean(np.log(np.maximum(cs, 1e-12)), axis=0))
                print(f"{family:5s} {method:18s} lr={lr:<6g} final {curves[(family, method, lr)][-1]:.3e}",
                      flush=True)

    rows = []
    lines = ["| family | lr | method | final loss | curve distance to full FT (same lr) |",
             "|---|---:|---|---:|---:|"]
    for family, lrs in (("sgd", SGD_LRS), ("adamw", ADAM_LRS)):
        for lr in lrs:
            ref = curves[(family, "full FT", lr)]
            for method in METHODS[family]:
                c = curves[(family, method, lr)]
                d = dist(c, ref)
                rows.append([family, lr, method, c[0], c[-1], d])
                lines.append(f"| {family} | {lr:g} | {method} | {c[-1]:.3e} | {d:.3f} |")
    lines += ["", "Best lr per method (by final loss), distance to full FT at its own best lr:", "",
              "| family | method | best lr | final loss | curve distance to best-lr full FT |",
              "|---|---|---:|---:|---:|"]
    best = {}
    for family, lrs in (("sgd", SGD_LRS), ("adamw", ADAM_LRS)):
        for method in METHODS[family]:
            lr = min(lrs, key=lambda lr: curves[(family, method, lr)][-1])
            best[(family, method)] = lr
        ref = curves[(family, "full FT", best[(family, "full FT")])]
        for method in METHODS[family]:
            lr = best[(family, method)]
            c = curves[(family, method, lr)]
            lines.append(f"| {family} | {method} | {lr:g} | {c[-1]:.3e} | {dist(c, ref):.3f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(OUT, "lora_pro_behaviour.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(OUT, "lora_pro_behaviour.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["family", "lr", "method", "initial_loss", "final_loss", "curve_distance_same_lr"])
        w.writerows(rows)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, family in zip(axes, ("sgd", "adamw")):
        for method in METHODS[family]:
            lr = best[(family, method)]
            ax.semilogy(curves[(family, method, lr)], label=f"{method} (lr {lr:g})",
                        lw=2.5 if method == "full FT" else 1.5, ls="--" if method == "full FT" else "-")
        ax.set_title(f"{family.upper()} family, best lr each (geo-mean of {len(SEEDS)} seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("train MSE")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "lora_pro_behaviour.png"), dpi=90)


if __name__ == "__main__":
    main()
