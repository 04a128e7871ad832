"""Does LoRA-Pro close the LoRA → full fine-tuning gap on a language model? Full FT, LoRA, LoRA-Pro
efficient and LoRA-Pro full (Algorithm 2) on SmolLM2-135M-Instruct and the `train.arith` problems,
each at its own learning rate chosen on a validation split, then over seeds.

    python -m bench.lm_sweep                 # the runs (resumable: rerun the same command), then the report
    python -m bench.lm_sweep --mechanism     # gradient/update figures on the chosen-lr runs (replayed)
    python -m bench.lm_sweep --summarise     # the report from finished runs only
    python -m bench.lm_sweep --dry-run       # the commands of the runs still to do

Every run is one ``python -m train.lm`` process (`bench.sweep.train_run`), skipped when its
``summary.json`` exists and resumed from its last checkpoint when it was cut off. The recipe is
LoRA-Pro's reference one where 2 CPU cores allow it (see `train.lm`'s docstring): r 8, α 16 on
q/k/v/o/gate/up/down of all layers, no dropout, float32 factors, AdamW with weight decay 0, warmup
3% then cosine, gradient clipping at global norm 1.0 before each method's optimizer. Every method
gets the same steps, batch, data and seeds (the seed fixes the batch order and the adapters' init,
so runs of one seed are paired).

1. The lr grid (seed 0): per method at least 4 lrs half a decade apart (1.5 decades), LoRA's and
   LoRA-Pro efficient's around LoRA's usual range, full FT's and Algorithm 2's on full FT's scale
   (Algorithm 2 moves W by lr times a projected full-shape Adam step). The chosen lr maximises
   ``val_acc`` (exact match on ``--val-limit`` training-split problems no run trains on; ties: the
   lower ``val_loss``), never the held-out set. A chosen lr at either end of its grid extends the
   grid by one more half decade on that side, until it is inside.
2. Seeds ``--seeds`` at each chosen lr (seed 0 is the grid's run).
3. The report (`bench.lm_report`): ``bench/results/lm_sweep.json``, ``bench/results/lm_sweep.png``
   and the section of bench/RESULTS.md.

Budget (2 CPU cores): a run of the defaults (100 steps of batch 4, 300 held-out and 100 validation
problems) takes about 8–10 min, about 4 h for the 24 runs without extensions; on one GPU, minutes.
"""

from __future__ import annotations

from support.lm_fidelity import parse_args, sweep


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.mechanism:
        from support import lm_mechanism
        lm_mechanism.main(a)
        return 0
    if not a.summarise:
        sweep(a)
    if not a.dry_run:
        from support import lm_report
        print(lm_report.report(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
