"""Instruction tuning SmolLM2-135M-Instruct on `train.arith`: base model vs LoRA vs LoRA-Pro, with the
same steps and learning-rate sweep for each method, then seeds at each method's best lr; plus a
4-bit (``--base q4``) vs float32 base timing pair. Each run is one ``python -m train.lm`` process.

    python -m bench.lm_sweep                 # the sweep (runs whose summary.json exists are skipped)
    python -m bench.lm_sweep --summarise     # the tables, from the run directories
    python -m bench.lm_sweep --samples 5     # held-out replies where base / LoRA / LoRA-Pro differ
    python -m bench.lm_sweep --timing-rounds 6   # 4-bit vs float32 base step time, interleaved

What it runs, in order, into ``--out`` (default ``runs/lm-sweep``):

1. ``timing-q4`` and ``timing-f32``: LoRA, ``--timing-steps`` steps on the 4-bit and on the float32
   base, back to back (``sec_per_step``, ``frozen_param_bytes``, ``step_memory_bytes``);
2. the lr sweep on seed 0: ``<method>-lr<lr>-s0`` for each method and each of ``--lrs``; the first
   one also evaluates the base model (``--eval-base``: it does not depend on the seed or method);
3. each method's best lr, chosen on ``val_acc`` (exact match on ``--val-limit`` training-split
   problems that no run trains on, not the held-out set; ties: lower final training loss), then
   seeds ``--seeds`` (besides 0) at it.

Held-out exact match (``eval_acc``, ``--eval-limit`` problems of the test split) is reported as mean
± sample std over the seeds at the chosen lr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("lora", "lora-pro")


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def train(out: Path, name: str, args: list[str], dry: bool) -> dict | None:
    """One ``python -m train.lm`` run named `name` (skipped when its summary.json exists)."""
    summary = out / name / "summary.json"
    if summary.is_file():
        print(f"[{name}] done already", flush=True)
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", "train.lm", "--out", str(out), "--name", name, "--overwrite", *args]
    print(f"[{name}] {time.strftime('%H:%M:%S')} {' '.join(cmd[1:])}", flush=True)
    if dry:
        return None
    t0 = time.time()
    rc = subprocess.run(cmd).returncode
    print(f"[{name}] exit {rc} after {time.time() - t0:.0f} s", flush=True)
    return json.loads(summary.read_text()) if rc == 0 and summary.is_file() else None


def best_lr(runs: dict[float, dict]) -> float:
    """The lr with the highest val_acc (ties: the lower training loss of the last 10% of steps)."""
    return max(runs, key=lambda lr: (runs[lr]["val_acc"], -runs[lr]["train_loss_last10pct"]))


def sweep(a) -> None:
    out = Path(a.out)
    common = ["--model", a.model, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
              "--eval-limit", str(a.eval_limit), "--eval-every", "100000", "--ckpt-every", "0",
              "--quiet", "--no-plot"]
    if a.timing_steps:
        for base in ("q4", "f32"):
            train(out, f"timing-{base}", ["--model", a.model, "--method", "lora", "--base", base,
                                          "--steps", str(a.timing_steps), "--batch-size", str(a.batch_size),
                                          "--lr", "1e-3", "--eval-limit", "16", "--eval-every", "100000",
                                          "--ckpt-every", "0", "--quiet", "--no-plot"], a.dry_run)
    chosen = {}
    first = True
    for method in a.methods:
        runs = {}
        for lr in a.lrs:
            s = train(out, run_name(method, lr, 0),
                      [*common, "--method", method, "--lr", str(lr), "--seed", "0", "--val-limit", str(a.val_limit),
                       *(["--eval-base"] if first else [])], a.dry_run)
            first = False
            if s is not None:
                runs[lr] = s
        if runs:
            chosen[method] = best_lr(runs)
            accs = ", ".join(f"{lr:g}: {r['val_acc']:.3f}" for lr, r in runs.items())
            print(f"[{method}] best lr on val_acc: {chosen[method]:g} ({accs})", flush=True)
    for method, lr in chosen.items():
        for seed in a.seeds:
            if seed != 0:
                train(out, run_name(method, lr, seed),
                      [*common, "--method", method, "--lr", str(lr), "--seed", str(seed),
                       "--val-limit", str(a.val_limit)], a.dry_run)


def load_runs(out: Path) -> list[dict]:
    runs = []
    for f in sorted(out.glob("*/summary.json")):
        s = json.loads(f.read_text())
        s["name"] = f.parent.name
        runs.append(s)
    return runs


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def summarise(out: Path) -> None:
    runs = load_runs(out)
    sweep_runs = [r for r in runs if not r["name"].startswith("timing-")]
    if not sweep_runs:
        print(f"no runs under {out}")
        return
    r0 = sweep_runs[0]
    base = [r for r in sweep_runs if r.get("base_eval_acc") is not None]
    print(f"SmolLM2-135M-Instruct on train.arith: {r0['steps']} steps x batch {r0.get('batch_size', '?')}, "
          f"{r0['eval_examples']} held-out problems, {r0.get('val_examples', 0)} validation problems")
    if base:
        b = base[0]
        print(f"base model: held-out exact match {b['base_eval_acc']:.3f}, answer loss {b['base_eval_loss']:.4f}")
    print("\nper run (seed 0 rows are the lr sweep):")
    print(f"{'method':10s} {'lr':>7s} {'seed':>4s} {'val_acc':>7s} {'eval_acc':>8s} {'eval_loss':>9s} "
          f"{'train_loss':>10s} {'s/step':>6s}")
    for r in sorted(sweep_runs, key=lambda r: (r["method"], r["seed"], r["lr"])):
        print(f"{r['method']:10s} {r['lr']:7.0e} {r['seed']:4d} {r.get('val_acc', float('nan')):7.3f} "
              f"{r['eval_acc']:8.3f} {r['eval_loss']:9.4f} {r['train_loss_last10pct']:10.4f} "
              f"{r['sec_per_step']:6.2f}")
    print("\nat each method's lr chosen on val_acc (seed 0):")
    for method in sorted({r["method"] for r in sweep_runs}):
        s0 = {r["lr"]: r for r in sweep_runs if r["method"] == method and r["seed"] == 0 and "val_acc" in r}
        if not s0:
            continue
        lr = best_lr(s0)
        accs = [r["eval_acc"] for r in sweep_runs if r["method"] == method and r["lr"] == lr]
        seeds = sorted(r["seed"] for r in sweep_runs if r["method"] == method and r["lr"] == lr)
        std = float(np.std(accs, ddof=1)) if len(accs) > 1 else float("nan")
        print(f"  {method:10s} lr {lr:g}: held-out exact match {np.mean(accs):.3f} ± {std:.3f} "
              f"(seeds {seeds}: {', '.join(f'{x:.3f}' for x in accs)})")
    timing = {r["name"]: r for r in runs if r["name"].startswith("timing-")}
    if timing:
        print("\nbase weights (LoRA, batch 4; memory_analysis of the compiled train step; one short run each, "
              "not interleaved: for step time see --timing-rounds):")
        for name in ("timing-q4", "timing-f32"):
            if name in timing:
                r, m = timing[name], timing[name].get("step_memory_bytes") or {}
                print(f"  {r['base']:3s}: {r['sec_per_step']:.2f} s/step (median of {r['steps']}), frozen base "
                      f"{_mib(r['frozen_param_bytes'])}, step arguments {_mib(m.get('argument'))}, "
                      f"temp {_mib(m.get('temp'))}, output {_mib(m.get('output'))}")
        if len(timing) == 2:
            q, f = timing["timing-q4"], timing["timing-f32"]
            mq, mf = q["step_memory_bytes"], f["step_memory_bytes"]
            print(f"  q4/f32: frozen base {q['frozen_param_bytes'] / f['frozen_param_bytes']:.3f}, "
                  f"arguments {mq['argument'] / mf['argument']:.3f}, temp {mq['temp'] / mf['temp']:.3f}, "
                  f"step time {q['sec_per_step'] / f['sec_per_step']:.2f}")


def samples(out: Path, n: int) -> None:
    """Held-out problems where the base model is wrong and LoRA / LoRA-Pro (seed 0, chosen lr) are
    right or differ, with the three replies."""
    runs = [r for r in load_runs(out) if not r["name"].startswith("timing-")]
    base_run = next((r for r in runs if r.get("base_eval_acc") is not None), None)
    if base_run is None:
        print("no run evaluated the base model")
        return
    read = lambda r: [json.loads(x) for x in (Path(r["run_dir"]) / "samples.jsonl").read_text().splitlines()]
    base = {s["question"]: s for s in read(base_run)}
    per = {}
    for method in METHODS:
        s0 = {r["lr"]: r for r in runs if r["method"] == method and r["seed"] == 0 and "val_acc" in r}
        if s0:
            per[method] = {s["question"]: s for s in read(s0[best_lr(s0)])}
    if len(per) < 2:
        print("need seed-0 runs of both methods")
        return
    shown = 0
    qs = list(base)
    # first where LoRA and LoRA-Pro disagree (taking each side's wins in turn), then where both
    # fixed a base error
    wins = {m: [q for q in qs if per[m][q]["correct"] and not per[o][q]["correct"]]
            for m, o in (("lora", "lora-pro"), ("lora-pro", "lora"))}
    turns = [q for pair in zip(wins["lora-pro"] + [None] * len(qs), wins["lora"] + [None] * len(qs))
             for q in pair if q is not None]
    order = turns + [q for q in qs if not base[q]["base_correct"] and per["lora"][q]["correct"]
                     and per["lora-pro"][q]["correct"]]
    seen = set()
    for q in order:
        if q in seen or shown >= n:
            continue
        seen.add(q)
        shown += 1
        print(f"Q: {q}   (answer {base[q]['answer']})")
        print(f"  base      [{'right' if base[q]['base_correct'] else 'wrong'}] {base[q]['base_reply']!r}")
        for m in METHODS:
            s = per[m][q]
            print(f"  {m:9s} [{'right' if s['correct'] else 'wrong'}] {s['reply']!r}")


def interleaved_timing(model: str, rounds: int, batch_size: int, method: str = "lora") -> None:
    """The compiled `train.lm` train step on the 4-bit and on the float32 base in one process,
    alternating (q4, f32, f32, q4, ...) for `rounds` rounds on the same batches, so load from other
    jobs falls on both alike; prints the median and quartiles of each, and their memory analysis."""
    import jax
    import jax.numpy as jnp

    from train import arith, lm, loop

    path = lm.resolve_model(model)
    runs = {}
    for base in ("q4", "f32"):
        args = lm.parse_args(["--model", model, "--method", method, "--base", base, "--batch-size", str(batch_size),
                              "--steps", str(2 * rounds + 2), "--lr", "1e-3"])
        setup = lm.build(args, path)
        probs = arith.problems("train", args.train_limit, args.data_seed)
        max_len = arith.longest_example(setup.tokenizer, probs)
        data = arith.encode(setup.tokenizer, probs, max_len, pad_id=arith.end_of_turn_id(setup.tokenizer))
        order = loop.BatchOrder(0, len(data["input_ids"]), batch_size)
        batches = [{k: jnp.asarray(data[k][order.indices(i)]) for k in ("input_ids", "attention_mask", "loss_mask")}
                   for i in range(2 * rounds + 2)]
        train_step, _ = lm.make_steps(setup, method)
        key = jax.random.key(0)
        opt_state = setup.optimizer.init(setup.trainable)
        t0 = time.perf_counter()
        step = train_step.lower(setup.trainable, opt_state, setup.frozen, batches[0], key).compile()
        compile_s = time.perf_counter() - t0
        runs[base] = {"step": step, "tr": setup.trainable, "opt": opt_state, "fr": setup.frozen,
                      "times": [], "mem": step.memory_analysis(), "compile_s": compile_s,
                      "frozen_bytes": loop.nbytes(setup.frozen)}
    for i in range(2 * rounds + 2):  # the first round of each: warm-up, not timed
        for base in (("q4", "f32") if i % 2 == 0 else ("f32", "q4")):
            r = runs[base]
            t0 = time.perf_counter()
            r["tr"], r["opt"], loss = r["step"](r["tr"], r["opt"], r["fr"], batches[i], key)
            jax.block_until_ready(loss)
            if i >= 2:
                r["times"].append(time.perf_counter() - t0)
    print(f"{method} train step, batch {batch_size}, {len(runs['q4']['times'])} interleaved steps each "
          f"({jax.devices()[0].platform}, jax {jax.__version__}):")
    for base, r in runs.items():
        t, m = np.asarray(r["times"]), r["mem"]
        print(f"  {base:3s}: {np.median(t):.2f} s/step (quartiles {np.percentile(t, 25):.2f}-{np.percentile(t, 75):.2f}), "
              f"frozen base {_mib(r['frozen_bytes'])}, arguments {_mib(m.argument_size_in_bytes)}, "
              f"temp {_mib(m.temp_size_in_bytes)}, compiled in {r['compile_s']:.0f} s")
    q, f = runs["q4"], runs["f32"]
    print(f"  q4/f32 median step time {np.median(q['times']) / np.median(f['times']):.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/lm-sweep")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 2e-3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--val-limit", type=int, default=50)
    ap.add_argument("--timing-steps", type=int, default=8, help="0: no 4-bit/float32 timing pair")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--summarise", action="store_true")
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--timing-rounds", type=int, default=0,
                    help="only time the 4-bit vs float32 base train step, interleaved in one process")
    a = ap.parse_args(argv)
    if a.timing_rounds:
        interleaved_timing(a.model, a.timing_rounds, a.batch_size)
        return
    if a.summarise or a.samples:
        if a.summarise:
            summarise(Path(a.out))
        if a.samples:
            samples(Path(a.out), a.samples)
        return
    sweep(a)
    summarise(Path(a.out))


if __name__ == "__main__":
    main()
