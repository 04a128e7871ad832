"""The LoRA-Pro paper's table (Wang et al. 2024, Table 1: full FT, LoRA, PiSSA, rsLoRA, LoRA+, DoRA,
LoRA-GA, ..., LoRA-Pro) in miniature: all-MiniLM-L6-v2 on the movie-review sentences and on the
3-class tweets, every method at its own learning rate chosen on a validation split, then 3 seeds.

    python -m bench.method_table               # the runs (resumable: rerun the same command), then the report
    python -m bench.method_table --summarise   # the report from finished runs only
    python -m bench.method_table --dry-run     # the commands of the runs still to do

Every run is one ``python -m train.classify`` process (`support.runs.train_run`), skipped when its
``summary.json`` exists, resumed from its checkpoint when cut off. Methods and grids:
`support.method_table` (AdaLoRA, which prunes ranks on a schedule, is not in this library). Each
lr grid has 3 half-decade values, extended past an end the choice lands on (`support.lr_grid`);
the choice is on ``--val-limit`` training sentences no run trains on, never the held-out split.

Budget (2 CPU cores, ≤ 2 hours): 2 datasets x 10 methods x (3 grid lrs + 2 more seeds) = 100 runs
of 60 steps of batch 16 plus the extensions; 65–80 s each (at 100 steps a run took 85–92 s, too many
for the budget). The grids are centred on a pilot sweep's choices, which keeps extensions few (the
section of bench/RESULTS.md has the measured wall time).
"""

from __future__ import annotations

from support.method_table import parse_args, report, sweep


def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.summarise:
        sweep(a)
    if not a.dry_run:
        print(report(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
