"""The runs of the LM fidelity experiment (`bench.lm_sweep` is its command line): the lr grids,
the choice on the validation split, the grid extension and the seeds. Each run is one
``python -m train.lm`` process (`support.runs.train_run`)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from support.runs import train_run

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "lora-pro", "lora-pro-adamw")
HALF_DECADE = math.sqrt(10.0)
# half-decade grids (10^(k/2)); 4 values = 1.5 decades
GRIDS = {"full": (-10, -9, -8, -7), "lora": (-8, -7, -6, -5),
         "lora-pro": (-8, -7, -6, -5), "lora-pro-adamw": (-10, -9, -8, -7)}
MAX_EXTENSIONS = 3


def lr_of(k: int) -> float:
    """10^(k/2), rounded to 3 significant digits (the value the run directory is named by)."""
    return float(f"{10 ** (k / 2):.3g}")


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def preference(summary: dict) -> tuple:
    """A run's rank in its lr grid: the higher val_acc, ties to the lower val_loss."""
    return summary["val_acc"], -summary["val_loss"]


def choose(runs: dict[int, dict]) -> int:
    """The grid index k of the preferred run (`preference`)."""
    return max(runs, key=lambda k: preference(runs[k]))


def run_args(a, method: str, lr: float, seed: int, *, eval_base: bool = False) -> list[str]:
    """The `train.lm` flags of one run of the sweep."""
    return ["--model", a.model, "--method", method, "--lr", repr(lr), "--seed", str(seed),
            "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--rank", "8", "--alpha", "16",
            "--warmup-ratio", "0.03", "--schedule", "cosine", "--weight-decay", "0", "--clip-norm", "1.0",
            "--eval-limit", str(a.eval_limit), "--val-limit", str(a.val_limit),
            "--eval-every", str(10 ** 9), "--ckpt-every", str(a.ckpt_every), "--keep", "1",
            "--quiet", "--no-plot", *(["--eval-base"] if eval_base else [])]


def one_run(a, method: str, k: int, seed: int, *, eval_base: bool = False) -> dict | None:
    """The run of (method, lr index k, seed): done already, resumed, or made; its checkpoints are
    deleted once its summary exists (the report needs none; `--mechanism` replays)."""
    out, lr = Path(a.out), lr_of(k)
    name = run_name(method, lr, seed)
    ckpt = out / name / "ckpt"
    resume = ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
    s = train_run("lm", out, name, run_args(a, method, lr, seed, eval_base=eval_base), a.dry_run,
                  resume=resume)
    if s is not None and ckpt.is_dir():
        shutil.rmtree(ckpt)
    return s


def sweep(a) -> dict[str, int]:
    """The grid runs (extended until the choice is inside), then the seeds; returns the chosen k
    per method (of the methods whose grid finished)."""
    chosen, first = {}, True
    grids = {m: list(GRIDS[m]) for m in a.methods}
    for method in a.methods:  # the whole grids first: a cut-off session leaves comparable methods
        for k in grids[method]:
            one_run(a, method, k, 0, eval_base=first)
            first = False
    for method in a.methods:
        for _ in range(MAX_EXTENSIONS + 1):
            runs = {k: s for k in grids[method] if (s := _summary(a, method, k, 0)) is not None}
            if len(runs) < len(grids[method]):
                break  # a run failed or this is a dry run: no choice
            best = choose(runs)
            print(f"[{method}] val_acc by lr: " + ", ".join(f"{lr_of(k):g}: {runs[k]['val_acc']:.3f}" for k in runs)
                  + f" -> {lr_of(best):g}", flush=True)
            if best not in (grids[method][0], grids[method][-1]):
                chosen[method] = best
                break
            k = grids[method][0] - 1 if best == grids[method][0] else grids[method][-1] + 1
            grids[method] = sorted(grids[method] + [k])
            one_run(a, method, k, 0)
    for method, k in chosen.items():
        for seed in a.seeds:
            if seed != 0:
                one_run(a, method, k, seed)
    return chosen


def _summary(a, method: str, k: int, seed: int) -> dict | None:
    f = Path(a.out) / run_name(method, lr_of(k), seed) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


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
