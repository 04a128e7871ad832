"""Multi-run experiments with the trainers: every run is one ``python -m train.<task>`` process,
skipped when its ``summary.json`` exists, and the tables are read back from the run directories.

    python -m bench.sweep classify                # MiniLM on movie reviews: 5 methods x 3 seeds, then the report
    python -m bench.sweep classify --report-only  # the report from finished runs
    python -m bench.sweep lm --timing-rounds 6    # SmolLM2: 4-bit vs float32 base step time, interleaved
    python -m bench.lm_sweep                      # SmolLM2 on train.arith: full FT, LoRA, both LoRA-Pro modes

``classify``: methods at equal steps and batch size (everything else as `train.classify`'s
defaults): frozen-encoder linear probe, full fine-tuning, LoRA (r=8, alpha=16, attention and FFN
kernels of all 6 layers), LoRA-Pro "efficient" (lora_pro + AdamW), LoRA-Pro AdamW (Algorithm 2).
Peak learning rates (linear warmup over 10% of the steps, cosine decay to 0), chosen once, not
tuned on the eval split:

  * probe 1e-2: only a 384x2 head from a random init trains; it needs a large step to get anywhere
    in a few hundred updates;
  * full 1e-4: BERT-style full fine-tuning (2e-5 ... 1e-4), the top of the range for a short run;
  * LoRA and LoRA-Pro efficient 2e-3: the top of the usual LoRA range (5e-4 ... 2e-3), for a short
    run; the same for both so that LoRA-Pro's gradient adjustment is the only difference (as in
    the paper);
  * LoRA-Pro AdamW 1e-4, full FT's: Algorithm 2 moves W by lr times the tangent-space projection
    of a full-shape Adam direction (entries ~1), i.e. full FT's AdamW step projected, so it takes
    full FT's learning rate. (5e-4, reasoning that the projection shrinks the step, is unstable:
    seed 0 collapses after ~50 steps — the output stops depending on the input, loss ln 2, eval
    accuracy 0.509 — while seed 1 reaches 0.785.) A finished run made with another lr than these
    is set aside (``superseded.jsonl``, listed in the report) and run again.

The report replaces the "## Fine-tuning MiniLM on movie reviews" section of bench/RESULTS.md (only
that section; the file is re-read right before writing), writes the loss plot to
bench/results/train_loss.png and the per-run summaries to bench/results/train_results.jsonl.

``lm --timing-rounds``: `train.lm`'s LoRA train step on SmolLM2-135M-Instruct with the base kept
4-bit (QLoRA) and dequantized to float32, in one process, interleaved. The method comparison on
SmolLM2 (which replaced this module's first two-method LoRA / LoRA-Pro sweep, still at commit
84cc3ec) is `bench.lm_sweep`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from support.runs import read_jsonl, load_runs, mean_std, train_run, write_section
from support.timing import interleave
from train import arith, lm, loop
from train.metrics import nbytes, plot_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# ------------------------------------------------------------------------------------------------
# classify: MiniLM on the movie-review sentences


CLASSIFY_METHODS = ("probe", "full", "lora", "lora-pro", "lora-pro-adamw")
CLASSIFY_LR = {"probe": 1e-2, "full": 1e-4, "lora": 2e-3, "lora-pro": 2e-3, "lora-pro-adamw": 1e-4}
CLASSIFY_LABEL = {"probe": "linear probe (frozen encoder)", "full": "full fine-tuning", "lora": "LoRA r=8",
                  "lora-pro": "LoRA-Pro efficient r=8", "lora-pro-adamw": "LoRA-Pro AdamW (Alg. 2) r=8"}
CLASSIFY_SECTION = "## Fine-tuning MiniLM on movie reviews"


def classify_args(a) -> list[str]:
    return ["--model", "minilm", "--dataset", "lora_jax_movie_reviews", "--steps", str(a.steps),
            "--batch-size", str(a.batch_size), "--max-len", str(a.max_len), "--eval-limit", str(a.eval_limit),
            "--train-eval-limit", str(a.train_eval_limit), "--eval-every", str(a.steps),
            "--clip-norm", "0",  # the recorded table predates --clip-norm (default 1.0) and ran without
            "--ckpt-every", str(a.steps), "--keep", "1", "--dropout", str(a.dropout), "--rank", "8", "--alpha", "16",
            "--quiet", "--no-plot"]


def classify_sweep(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for method in a.methods:
            name = f"{method}-s{seed}"
            summary = out / name / "summary.json"
            if summary.is_file():
                s = json.loads(summary.read_text())
                if not math.isclose(s["lr"], CLASSIFY_LR[method]):  # another lr than CLASSIFY_LR's
                    with open(out / "superseded.jsonl", "a") as f:
                        f.write(json.dumps(s) + "\n")
                    summary.unlink()
            train_run("classify", out, name, classify_args(a) + ["--method", method, "--seed", str(seed),
                                                                 "--lr", str(CLASSIFY_LR[method])], a.dry_run)


def classify_report(a) -> str:
    out = Path(a.out)
    runs = sorted((r for r in load_runs(out) if r.get("method") in CLASSIFY_LR),
                  key=lambda r: (r["seed"], CLASSIFY_METHODS.index(r["method"])))
    if not runs:
        return f"no runs under {out}: bench/RESULTS.md left as it is"
    by = {m: sorted([r for r in runs if r["method"] == m], key=lambda r: r["seed"]) for m in CLASSIFY_METHODS}
    lines = [CLASSIFY_SECTION, "",
             f"`python -m bench.sweep classify` (`bench/sweep.py`; `--report-only` rebuilds this section from the "
             f"run directories): all-MiniLM-L6-v2 (22.7M parameters) "
             f"fine-tuned on the movie-review sentences (`lora_jax_movie_reviews`: valence > 0 positive, < 0 "
             f"negative, zeros dropped; 8,566 train / 2,000 held-out). {a.steps} steps of batch {a.batch_size}, "
             f"max_len {a.max_len}, warmup 10% + cosine, dropout {a.dropout:g}, seeds {list(a.seeds)}; "
             f"eval accuracy on the first {a.eval_limit} held-out sentences (fixed split); train loss at step "
             f"{a.steps} as the mean cross-entropy, no dropout, on the first {a.train_eval_limit} training "
             f"sentences (and, noisier, the mean minibatch loss over the last 10% of steps). Mean ± sample std "
             f"over seeds. 2 CPU cores shared with other jobs: seconds per step are indicative only.", "",
             "| method | peak lr | trainable params | eval accuracy | train loss @ end (fixed 256) | "
             "minibatch loss, last 10% | s/step | checkpoint / full-model params |",
             "|---|---|---|---|---|---|---|---|"]
    for m in CLASSIFY_METHODS:
        rs = by[m]
        if not rs:
            continue
        ck = rs[0].get("checkpoint_bytes")
        ck_txt = f"{ck / 1e6:.2f} MB / {rs[0]['full_model_param_bytes'] / 1e6:.1f} MB" if ck else "n/a"
        lines.append(
            f"| {CLASSIFY_LABEL[m]} | {rs[0]['lr']:g} | {rs[0]['trainable_params']:,} | "
            f"{mean_std([r['eval_acc'] for r in rs])} | {mean_std([r.get('train_eval_loss') for r in rs])} | "
            f"{mean_std([r['train_loss_last10pct'] for r in rs])} | "
            f"{mean_std([r['sec_per_step'] for r in rs], '{:.2f}')} | {ck_txt} |")
    lines.append("")
    lines += _gap_lines(by) + _probe_lines(by)
    if plot_runs(out, RESULTS / "train_loss.png") is not None:
        lines += ["Loss curves (moving average of 20 steps, every run): `bench/results/train_loss.png`; per-run "
                  "summaries: `bench/results/train_results.jsonl`.", ""]
    sup = read_jsonl(out / "superseded.jsonl")
    if sup:
        lines += ["Superseded runs (another learning rate, not in the table): " + "; ".join(
            f"{r['method']} lr {r['lr']:g} seed {r['seed']}: eval acc {r['eval_acc']:.3f}, fixed-subset train loss "
            f"{r['train_eval_loss']:.3f}" for r in sup) + ".", ""]
    lines += [f"Budget: the {len(runs)} runs of the table took "
              f"{sum(r.get('run_wall_s', 0) for r in runs) / 60:.0f} min of wall time in all (a process each: "
              f"start-up, compilation and evaluation included).", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_results.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k not in ("run_dir", "name")}) + "\n" for r in runs))
    text = "\n".join(lines)
    write_section(ROOT / "bench" / "RESULTS.md", CLASSIFY_SECTION, text)
    return text


def _seed_mean(by, m, key):
    v = [r.get(key) for r in by[m] if r.get(key) is not None]
    return float(np.mean(v)) if v else None


def _gap_lines(by) -> list[str]:
    """The fraction of the LoRA → full-FT train-loss gap each LoRA-Pro mode closes."""
    out = []
    for key, what in (("train_eval_loss", "fixed-subset train loss"),
                      ("train_loss_last10pct", "minibatch loss (last 10%)")):
        lo, fu = _seed_mean(by, "lora", key), _seed_mean(by, "full", key)
        if lo is None or fu is None:
            continue
        for m in ("lora-pro", "lora-pro-adamw"):
            v = _seed_mean(by, m, key)
            if v is None:
                continue
            gap = lo - fu
            frac = (lo - v) / gap if abs(gap) > 1e-12 else float("nan")
            out.append(f"- {what}: LoRA {lo:.4f}, full FT {fu:.4f}, {CLASSIFY_LABEL[m]} {v:.4f} → closes "
                       f"**{100 * frac:.0f}%** of the LoRA → full-FT gap")
    if not out:
        return []
    return ["Fraction of the LoRA → full-FT train-loss gap that LoRA-Pro closes, (L_LoRA − L_method) / "
            "(L_LoRA − L_full), on seed means:", ""] + out + [""]


def _probe_lines(by) -> list[str]:
    probe = _seed_mean(by, "probe", "eval_acc")
    if probe is None:
        return []
    best = {m: _seed_mean(by, m, "eval_acc") for m in ("full", "lora", "lora-pro", "lora-pro-adamw")
            if _seed_mean(by, m, "eval_acc") is not None}
    return ["Against the linear probe (" + f"{probe:.4f}" + "): " + ", ".join(
        f"{CLASSIFY_LABEL[m]} {v - probe:+.4f}" for m, v in best.items()) + " eval accuracy.", ""]


# ------------------------------------------------------------------------------------------------
# lm: SmolLM2-135M-Instruct on train.arith


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def lm_timing(model: str, rounds: int, batch_size: int, method: str = "lora") -> None:
    """The compiled `train.lm` train step on the 4-bit and on the float32 base in one process, in
    interleaved rounds (`support.timing`, the order alternating) on the same batches, so load from
    other jobs falls on both alike: 2 warm-up steps then 2·`rounds` timed steps each; prints the
    median and quartiles of each, and their memory analysis."""
    path = lm.resolve_model(model)
    steps = 2 * rounds + 2
    runs = {}
    for base in ("q4", "f32"):
        args = lm.parse_args(["--model", model, "--method", method, "--base", base, "--batch-size", str(batch_size),
                              "--steps", str(steps), "--lr", "1e-3"])
        setup = lm.build(args, path)
        probs = arith.problems("train", args.train_limit, args.data_seed)
        max_len = arith.longest_example(setup.tokenizer, probs)
        data = arith.encode(setup.tokenizer, probs, max_len, pad_id=arith.end_of_turn_id(setup.tokenizer))
        order = loop.BatchOrder(0, len(data["input_ids"]), batch_size)
        batches = [{k: jnp.asarray(data[k][order.indices(i)]) for k in ("input_ids", "attention_mask", "loss_mask")}
                   for i in range(steps)]
        train_step, _ = lm.make_steps(setup, method)
        key = jax.random.key(0)
        opt_state = setup.optimizer.init(setup.trainable)
        t0 = time.perf_counter()
        step = train_step.lower(setup.trainable, opt_state, setup.frozen, batches[0], key).compile()
        runs[base] = {"step": step, "state": [setup.trainable, opt_state], "frozen": setup.frozen,
                      "batches": iter(batches), "mem": step.memory_analysis(),
                      "compile_s": time.perf_counter() - t0, "frozen_bytes": nbytes(setup.frozen)}

    def one_step(r, key=jax.random.key(0)) -> float:
        t0 = time.perf_counter()
        r["state"][0], r["state"][1], loss = r["step"](*r["state"], r["frozen"], next(r["batches"]), key)
        jax.block_until_ready(loss)
        return time.perf_counter() - t0

    timings = interleave({base: (lambda r=r: one_step(r)) for base, r in runs.items()}, steps - 2,
                         warmup=2, rotate=True)
    print(f"{method} train step, batch {batch_size}, {timings.rounds} interleaved steps each "
          f"({jax.devices()[0].platform}, jax {jax.__version__}):")
    for base, r in runs.items():
        t, m = np.asarray(timings.times[base]), r["mem"]
        print(f"  {base:3s}: {np.median(t):.2f} s/step (quartiles {np.percentile(t, 25):.2f}-{np.percentile(t, 75):.2f}), "
              f"frozen base {_mib(r['frozen_bytes'])}, arguments {_mib(m.argument_size_in_bytes)}, "
              f"temp {_mib(m.temp_size_in_bytes)}, compiled in {r['compile_s']:.0f} s")
    print(f"  q4/f32 median step time {timings.median('q4') / timings.median('f32'):.2f}")


# ------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="experiment", required=True)
    c = sub.add_parser("classify", help="MiniLM on the movie-review sentences, 5 methods x 3 seeds")
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--max-len", type=int, default=32)
    c.add_argument("--dropout", type=float, default=0.0, help="encoder/head dropout (0: runs under one epoch)")
    c.add_argument("--eval-limit", type=int, default=1000)
    c.add_argument("--train-eval-limit", type=int, default=256)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--methods", nargs="+", default=list(CLASSIFY_METHODS), choices=CLASSIFY_METHODS)
    c.add_argument("--out", default=str(ROOT / "runs" / "train_results"))
    c.add_argument("--report-only", action="store_true")
    c.add_argument("--dry-run", action="store_true", help="print the commands only")
    m = sub.add_parser("lm", help="SmolLM2-135M-Instruct: 4-bit vs float32 base train step, interleaved "
                                  "(the method comparison is python -m bench.lm_sweep)")
    m.add_argument("--model", default="smollm2")
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--timing-rounds", type=int, default=6, help="timed steps per base: 2 x this")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.experiment == "classify":
        if not a.report_only:
            classify_sweep(a)
        if not a.dry_run:
            print(classify_report(a))
        return 0
    lm_timing(a.model, a.timing_rounds, a.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
