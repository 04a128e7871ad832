"""The runs of the LM fidelity experiment (`bench.lm_sweep` is its command line): the lr grids,
the choice on the validation split, the grid extension and the seeds. Each run is one
``python -m train.lm`` process (`support.runs.train_run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from support import lr_grid
from support.runs import train_run

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "lora-pro", "lora-pro-adamw")
# half-decade grids (10^(k/2)); 4 values = 1.5 decades
GRIDS = {"full": (-10, -9, -8, -7), "lora": (-8, -7, -6, -5),
         "lora-pro": (-8, -7, -6, -5), "lora-pro-adamw": (-10, -9, -8, -7)}


def run_args(a, method: str, lr: float, seed: int, *, eval_base: bool = False) -> list[str]:
    """The `train.lm` flags of one run of the sweep."""
    return ["--model", a.model, "--method", method, "--lr", repr(lr), "--seed", str(seed),
            "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--rank", "8", "--alpha", "16",
            "--warmup-ratio", "0.03", "--schedule", "cosine", "--weight-decay", "0", "--clip-norm", "1.0",
            "--eval-limit", str(a.eval_limit), "--val-limit", str(a.val_limit),
            "--eval-every", str(10 ** 9), "--ckpt-every", str(a.ckpt_every), "--keep", "1",
            "--quiet", "--no-plot", *(["--eval-base"] if eval_base else [])]


def sweep(a) -> dict[str, int]:
    """`support.lr_grid.sweep` of `train.lm` over ``a.methods`` (the base model evaluated in the
    first run); returns the chosen k per method."""
    return lr_grid.sweep("lm", Path(a.out), {m: GRIDS[m] for m in a.methods},
                         lambda m, lr, seed, first: run_args(a, m, lr, seed, eval_base=first), a.seeds,
                         dry_run=a.dry_run, train=lambda *args, **kw: train_run(*args, **kw))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.lm_sweep", description="Full FT, LoRA and both LoRA-Pro modes on SmolLM2: lr sweeps on validation, then seeds (bench/lm_sweep.py)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "lm-fidelity"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--val-limit", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=25, help="so that a run cut off resumes")
    ap.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do")
    ap.add_argument("--summarise", action="store_true", help="only the report, from finished runs")
    ap.add_argument("--mechanism", action="store_true",
                    help="only the gradient/update figures of the chosen-lr seed-0 runs (bench.lm_mechanism)")
    return ap.parse_args(argv)
