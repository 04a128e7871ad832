"""Learning rates chosen on a validation split, then seeds: the sweep `bench.lm_sweep` and
`bench.method_table` share. Per method a grid of half-decade lrs ``10^(k/2)`` (seed 0), the one with
the best validation score chosen (`preference`), the grid extended by half a decade past an end
the choice lands on until the choice is inside, then the other seeds at the chosen lr. Each run is
one ``python -m train.<task>`` process (`support.runs.train_run`), skipped when done, resumed when
cut off; its checkpoints are deleted once its summary exists."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

from support.runs import load_runs, train_run

HALF_DECADE = math.sqrt(10.0)
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


def collect(out: Path, methods, method_of: Callable[[dict], str | None]) -> dict:
    """Per method (``method_of(summary)``, e.g. its ``method`` field or a run-name prefix): its
    seed-0 grid runs by lr, the chosen one (`preference`), the runs at its lr by seed, and whether
    the choice is inside the grid."""
    runs = [r for r in load_runs(out) if method_of(r) in methods]
    per = {}
    for m in methods:
        mine = [r for r in runs if method_of(r) == m]
        grid = sorted((r for r in mine if r["seed"] == 0 and "val_acc" in r), key=lambda r: r["lr"])
        if not grid:
            continue
        best = max(grid, key=preference)
        at = sorted((r for r in mine if r["lr"] == best["lr"]), key=lambda r: r["seed"])
        per[m] = {"grid": grid, "chosen": best, "seeds": at, "inside": grid[0]["lr"] < best["lr"] < grid[-1]["lr"]}
    return per


def summary_of(out: Path, method: str, k: int, seed: int) -> dict | None:
    f = Path(out) / run_name(method, lr_of(k), seed) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def one_run(task: str, out: Path, method: str, k: int, seed: int, flags: list[str], dry_run: bool = False,
            train: Callable = train_run) -> dict | None:
    """The run of (method, lr index k, seed) with the trainer `flags`: done already, resumed, or made."""
    name = run_name(method, lr_of(k), seed)
    ckpt = Path(out) / name / "ckpt"
    resume = ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
    s = train(task, Path(out), name, flags, dry_run, resume=resume)
    if s is not None and ckpt.is_dir():
        shutil.rmtree(ckpt)
    return s


def sweep(task: str, out: Path, grids: dict[str, tuple[int, ...]], flags_of: Callable[..., list[str]],
          seeds, *, dry_run: bool = False, train: Callable = train_run) -> dict[str, int]:
    """The grid runs of every method (extended until the choice is inside), then `seeds`; returns
    the chosen k per method (of the methods whose grid finished). ``flags_of(method, lr, seed,
    first=...)`` gives a run's trainer flags (`first`: the sweep's very first run)."""
    chosen, first = {}, True
    grids = {m: list(g) for m, g in grids.items()}

    def run(method, k, seed, first=False):
        return one_run(task, out, method, k, seed, flags_of(method, lr_of(k), seed, first=first), dry_run, train)

    for method in grids:  # the whole grids first: a cut-off session leaves comparable methods
        for k in grids[method]:
            run(method, k, 0, first)
            first = False
    for method in grids:
        for _ in range(MAX_EXTENSIONS + 1):
            runs = {k: s for k in grids[method] if (s := summary_of(out, method, k, 0)) is not None}
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
            run(method, k, 0)
    for method, k in chosen.items():
        for seed in seeds:
            if seed != 0:
                run(method, k, seed)
    return chosen
