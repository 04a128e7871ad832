"""lora_jax side by side with PyTorch: PEFT LoRA, full fine-tuning and the `lora-pro-adamw` port.

    python -m bench.peers                      # all-MiniLM-L6-v2 (real weights), batch 16 × 64, r 8, α 16
    python -m bench.peers --model bert-base    # BERT-base shape (12 × 768), random weights
    python -m bench.peers --setup-only         # just create the peers' virtual environment
    python -m bench.peers --differences        # lora-pro-adamw's definition differences, with evidence
    python -m bench.peers --profile            # where the LoRA step's time goes (both frameworks)
    python -m bench.peers --optimizer-updates bert-base   # one optimizer update alone
    python -m bench.peers --all                # every table of bench/RESULTS.md's "PEFT side by side"
    python -m bench.peers --all --rounds 1     # the same end to end, benchmarks and profiles cut to 1 round

The harness (the peers' virtual environment, the PyTorch worker, one case written for both
frameworks, the JAX steps) is `support.peers`.

Methods, timed in interleaved rounds (`support.timing`, round robin over both frameworks starting
one later each round, a pause before each block so one side's idle worker threads stop spinning),
medians of ``--rounds`` blocks of ``--steps`` steps:

  jax:   full FT (optax.adamw), LoRA (wrap + adamw), LoRA-Pro efficient (lora_pro() + adamw),
         LoRA-Pro AdamW (lora_pro_adamw, Algorithm 2)
  torch: full FT (torch.optim.AdamW), PEFT LoRA (AdamW), lora-pro-adamw mode "full" and
         "efficient" (its defaults: efficient_solver="vec")
  forward (no grad): base model, unmerged adapters, merged adapters — on both sides.

Prints a table and the ratios (of medians) that have goals, writes ``--json`` (default
bench/results/peers-<model>.json). XLA's FLOP counts of the JAX steps are recorded as the first profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from support.peers import (JAX_METHODS, LABELS, ROOT, TORCH_METHODS, WORKER, Server, ensure_venv, flops_of,
                           jax_batch, jax_forwards, jax_versions, machine, make_case, make_jax_method,
                           peers_python, run_worker, worker_spec)
from support.timing import interleave, timed

DIFFERENCES = ROOT / "support" / "peer_differences.py"


def step_block(method, batch, n: int):
    """A timing contender (`support.timing`): `n` steps of a `make_jax_method` result on `batch`,
    its state carried from call to call; seconds per step."""
    import jax

    step, st, _ = method

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            st[0], st[1], loss = step(st[0], st[1], st[2], batch)
        jax.block_until_ready((st[0], loss))
        return (time.perf_counter() - t0) / n
    return run


def benchmark(args) -> dict:
    import jax

    python = ensure_venv()
    machine_start = machine()
    tmp = Path(tempfile.mkdtemp(prefix="lora_jax_peers_"))
    kind = args.model
    print(f"building {kind} (batch {args.batch} × {args.seq}, r {args.rank}, alpha {args.alpha}) ...",
          file=sys.stderr, flush=True)
    case = make_case(kind, tmp, batch=args.batch, seq=args.seq, rank=args.rank, alpha=args.alpha)
    b = jax_batch(case)
    server = Server(python)
    try:
        spec = worker_spec(case, "serve", tmp / "unused.npz", lr=args.lr, weight_decay=0.0,
                           methods=list(TORCH_METHODS), threads=args.torch_threads)
        info = server(op="setup", spec=spec)
        jm = {m: make_jax_method(case, m, lr=args.lr) for m in JAX_METHODS}
        fw = jax_forwards(case)

        def jax_block(m, n):
            return step_block(jm[m], b, n)

        def jax_forward(w, n):
            fn, p = fw[w]
            return timed(lambda: fn(p, b), repeat=n)

        def torch_block(op, n, **which):
            return lambda: server(op=op, n=n, **which)["sec"]

        profile = {}
        for m in JAX_METHODS:  # compile (and record XLA's FLOP count)
            step, st, raw = jm[m]
            profile[m] = {"xla_flops": flops_of(raw, st[0], st[1], st[2], b)}
            t0 = time.perf_counter()
            jax_block(m, 1)()
            profile[m]["first_call_s"] = time.perf_counter() - t0
        for w, (fn, p) in fw.items():
            jax_forward(w, 1)()
            profile[f"fwd_{w}"] = {"xla_flops": flops_of(lambda p, b: fn(p, b), p, b)}
        for m in TORCH_METHODS:
            server(op="step", method=m, n=1)
        for w in ("base", "unmerged", "merged"):
            server(op="forward", which=w, n=1)

        contenders = {**{m: jax_block(m, args.steps) for m in JAX_METHODS},
                      **{f"torch_{m}": torch_block("step", args.steps, method=m) for m in TORCH_METHODS},
                      **{f"jax_fwd_{w}": jax_forward(w, args.fwd_steps) for w in fw},
                      **{f"torch_fwd_{w}": torch_block("forward", args.fwd_steps, which=w) for w in fw}}
        timings = interleave(contenders, args.rounds, warmup=0, rotate=True, pause=args.pause,
                             after_round=lambda r: print(f"round {r + 1}/{args.rounds} done",
                                                         file=sys.stderr, flush=True))
        times = timings.times
    finally:
        server.close()

    med = {k: float(v) for k, v in timings.medians().items()}
    ratios = {
        "lora_jax LoRA / PEFT LoRA step": (med["jax_lora"] / med["torch_lora"], 0.8),
        "lora_jax LoRA-Pro AdamW / lora-pro-adamw full": (med["jax_lora_pro_adamw"] / med["torch_lora_pro_full"], 0.5),
        "lora_jax LoRA / lora_jax full FT": (med["jax_lora"] / med["jax_full"], 0.75),
        "lora_jax merged / base forward": (med["jax_fwd_merged"] / med["jax_fwd_base"], 1.02),
        "PEFT LoRA / PyTorch full FT (reference)": (med["torch_lora"] / med["torch_full"], None),
        "PEFT merged / base forward (reference)": (med["torch_fwd_merged"] / med["torch_fwd_base"], None),
        "lora_jax LoRA-Pro efficient / lora-pro-adamw efficient": (
            med["jax_lora_pro_efficient"] / med["torch_lora_pro_efficient"], None),
    }
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench.peers " + " ".join(sys.argv[1:]),
        "model": kind, "batch": args.batch, "seq": args.seq, "rank": args.rank, "alpha": args.alpha,
        "lr": args.lr, "rounds": args.rounds, "steps_per_block": args.steps, "fwd_steps_per_block": args.fwd_steps,
        "targets": case.modules, "machine": {**machine_start, "load_avg_end": os.getloadavg()},
        "jax": {**jax_versions(), "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]},
        "torch": {**info["versions"], "threads": info["threads"]},
        "times_s": times, "median_s": med,
        "ratios": {k: {"value": v, "goal": g, "met": None if g is None else v <= g} for k, (v, g) in ratios.items()},
        "profile": profile,
    }


def format_table(res: dict) -> str:
    med = res["median_s"]
    lines = [f"# {res['model']}: batch {res['batch']} × {res['seq']}, r {res['rank']}, alpha {res['alpha']}; "
             f"{res['rounds']} rounds; {res['machine']['cpu']} ({res['machine']['cores']} cores), "
             f"load {res['machine']['load_avg_start'][0]:.2f} → {res['machine']['load_avg_end'][0]:.2f}",
             f"# jax {res['jax']['jax']} ({res['jax']['backend']}); torch {res['torch']['torch']} "
             f"({res['torch']['threads']} threads), transformers {res['torch']['transformers']}, "
             f"peft {res['torch']['peft']}, lora-pro-adamw {res['torch']['lora-pro-adamw']}",
             "", f"{'train step':44s} {'median ms':>10s} {'min ms':>9s}"]
    for k in [*JAX_METHODS, *(f"torch_{m}" for m in TORCH_METHODS)]:
        lines.append(f"{LABELS[k]:44s} {1e3 * med[k]:10.1f} {1e3 * min(res['times_s'][k]):9.1f}")
    lines += ["", f"{'forward (no grad)':44s} {'median ms':>10s} {'min ms':>9s}"]
    for side in ("jax", "torch"):
        for w in ("base", "unmerged", "merged"):
            k = f"{side}_fwd_{w}"
            name = f"{'lora_jax' if side == 'jax' else 'PyTorch/PEFT'} {w}"
            lines.append(f"{name:44s} {1e3 * med[k]:10.1f} {1e3 * min(res['times_s'][k]):9.1f}")
    lines += ["", f"{'ratio':56s} {'value':>7s} {'goal':>6s}"]
    for k, v in res["ratios"].items():
        goal = "" if v["goal"] is None else f"≤{v['goal']}"
        met = "" if v["met"] is None else ("met" if v["met"] else "MISSED")
        lines.append(f"{k:56s} {v['value']:7.3f} {goal:>6s} {met}")
    fl = res["profile"]
    if fl.get("jax_full", {}).get("xla_flops"):
        full = fl["jax_full"]["xla_flops"]
        lines += ["", "XLA FLOPs of the JAX steps (relative to full FT): " + ", ".join(
            f"{m[4:]} {fl[m]['xla_flops'] / 1e9:.1f} G ({fl[m]['xla_flops'] / full:.3f})"
            for m in JAX_METHODS if fl[m].get("xla_flops"))]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the profile: where a LoRA step's time goes, and why the goals above are missed


def products() -> list[str]:
    """The products of one adapted Linear (rank 8, MiniLM's shapes, 1024 tokens), jitted alone,
    each the mean of 30 calls."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    lines = ["# JAX products (ms): T x in x out: x@w, dW = xT@dy, grad a = xT@(dy@bT), grad b = (x@a)T@dy"]
    for (T, i, o) in [(1024, 384, 384), (1024, 384, 1536), (1024, 1536, 384)]:
        x, dy = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((T, i), (T, o)))
        w, a = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((i, o), (i, 8)))
        b = jnp.asarray(rng.standard_normal((8, o)), jnp.float32)
        fns = {"x@w": (jax.jit(lambda x, w: x @ w), (x, w)),
               "dW": (jax.jit(lambda x, dy: x.T @ dy), (x, dy)),
               "grad a": (jax.jit(lambda x, dy, b: x.T @ (dy @ b.T)), (x, dy, b)),
               "grad b": (jax.jit(lambda x, a, dy: (x @ a).T @ dy), (x, a, dy))}
        ms = interleave({k: timed(lambda f=f, args=args: f(*args), repeat=30)
                         for k, (f, args) in fns.items()}, 1).medians()
        lines.append(f"{T}x{i}x{o}: " + " ".join(f"{1e3 * ms[k]:.3f}" for k in fns))
    return lines


def optimizer_updates(kind: str = "bert-base", rounds: int = 5) -> dict[str, float]:
    """Median seconds of one optimizer update alone (jitted by itself) on `kind`'s adapter tree:
    optax.adamw, lora_pro() + adamw, lora_pro_adamw."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax
    from train import assets, bert

    cfg = (bert.BertConfig() if kind == "bert-base"
           else bert.load_hf_safetensors(assets.minilm_dir(), with_pooler=True)[0])
    model, v = bert.init_classifier(cfg, 2, jax.random.key(0), pooling="pooler")
    ad = lora_jax.apply(v["params"], 8, alpha=16, targets=bert.LORA_TARGETS)
    tr, _ = lora_jax.split(ad, trainable="^head/")
    tr = jax.tree.map(lambda x: x + 0.01, tr)
    g = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), tr)
    contenders = {}
    for name, opt in (("optax.adamw", optax.adamw(1e-4)),
                      ("lora_pro() + adamw", optax.chain(lora_jax.lora_pro(), optax.adamw(1e-4))),
                      ("lora_pro_adamw", lora_jax.lora_pro_adamw(1e-4))):
        f = jax.jit(lambda g, st, p, opt=opt: opt.update(g, st, p))
        contenders[name] = timed(lambda f=f, st=opt.init(tr): f(g, st, tr))
    return interleave(contenders, rounds).medians()


def ablation(case, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each JAX variant, every round (see `profile`)."""
    import jax
    import optax

    import lora_jax

    b = jax_batch(case)
    model = case.model
    tr, fr = lora_jax.split(case.adapted, trainable=r"^head/")
    fwd = lora_jax.wrap(model.apply)
    inputs = (b["input_ids"], b["attention_mask"], b["token_type_ids"])

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    def lora_loss(tr, m=model):
        return ce(lora_jax.wrap(m.apply)({"params": lora_jax.combine(tr, fr)}, *inputs))

    def full_loss(p):
        return ce(model.apply({"params": p}, *inputs))

    ln_tr, ln_fr = lora_jax.split(case.params, trainable=lambda path, leaf: "LayerNorm" in path
                                  and path.endswith("scale"))
    gelu_tanh = dataclasses.replace(model, config=dataclasses.replace(model.config, hidden_act="gelu_new"))
    fns = {
        "forward (base)": (jax.jit(lambda p: model.apply({"params": p}, *inputs)), (case.params,)),
        "forward (unmerged LoRA)": (jax.jit(lambda t: fwd({"params": lora_jax.combine(t, fr)}, *inputs)), (tr,)),
        "data backward (grad of LN scales only)": (
            jax.jit(jax.value_and_grad(lambda t: full_loss(lora_jax.combine(t, ln_fr)))), (ln_tr,)),
        "LoRA value_and_grad": (jax.jit(jax.value_and_grad(lora_loss)), (tr,)),
        "LoRA value_and_grad, tanh GELU": (jax.jit(jax.value_and_grad(lambda t: lora_loss(t, gelu_tanh))), (tr,)),
        "full FT value_and_grad": (jax.jit(jax.value_and_grad(full_loss)), (case.params,)),
    }
    contenders = {k: timed(lambda fn=fn, a=a: fn(*a), repeat=steps) for k, (fn, a) in fns.items()}

    contenders["LoRA step (adamw)"] = step_block(make_jax_method(case, "jax_lora"), b, steps)
    contenders["full FT step (adamw)"] = step_block(make_jax_method(case, "jax_full"), b, steps)
    return interleave(contenders, rounds).times


def profile(args) -> None:
    """JAX side: an ablation, each variant jitted and timed in interleaved rounds (medians):
    forward; "data backward" (value and grad with respect to the LayerNorm scales only: the whole
    backward chain of activations, no weight gradients); LoRA grad (no optimizer); LoRA step;
    full-FT grad (no optimizer); full-FT step; LoRA grad with the tanh GELU instead of erf.
    PyTorch side (peers venv): torch.profiler's self-CPU-time table of two PEFT LoRA steps.
    Both sides: the four products of one adapted Linear (x@w, dW, grad a, grad b) timed alone.
    Writes bench/results/peers-profile-<model>.json."""
    tmp = Path(tempfile.mkdtemp(prefix="lora_jax_peers_prof_"))
    case = make_case(args.model, tmp)
    times = ablation(case, args.rounds, args.steps)
    print(f"# JAX ablation, {args.model}, batch {case.batch['input_ids'].shape}, r {case.rank}; "
          f"medians of {args.rounds} rounds; load {os.getloadavg()[0]:.2f}")
    med = {k: float(statistics.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:44s} {1e3 * v:8.1f} ms")
    prod = products()
    print("\n" + "\n".join(prod))
    torch_table = None
    py = peers_python()
    if py is not None:
        try:
            torch_table = run_worker(worker_spec(case, "profile", tmp / "x.npz", lr=1e-4, weight_decay=0.0),
                                     tmp, py)["table"]
        except RuntimeError as e:
            torch_table = str(e)[-2000:]
        print("\n# PyTorch: PEFT LoRA step, torch.profiler (2 steps)\n" + torch_table)
    out = ROOT / "bench" / "results" / f"peers-profile-{args.model}.json"
    out.write_text(json.dumps({"median_s": med, "times_s": times, "jax_products": prod, "torch_profile": torch_table},
                              indent=1))
    print(f"wrote {out}")


def run_all(rounds: int | None = None) -> None:
    """Every table of the section, in order. `rounds` (``--all --rounds N``): the benchmarks' and
    profiles' rounds, for a quick end-to-end check (the tests always run in full)."""
    py = ensure_venv()
    r = ["--rounds", str(rounds)] if rounds else []
    steps = [
        ("lora-pro-adamw's definition differences", [str(py), str(DIFFERENCES)]),
        ("cross-checks against transformers, PEFT and lora-pro-adamw",
         [sys.executable, "-m", "pytest", "-m", "slow or not slow", "-s", "-q", "-p", "no:cacheprovider",
          "tests/test_peers.py", "tests/test_peft_format.py"]),
        ("benchmark: all-MiniLM-L6-v2", [sys.executable, "-m", "bench.peers", "--model", "minilm", *r]),
        ("benchmark: BERT-base shape, random weights",
         [sys.executable, "-m", "bench.peers", "--model", "bert-base", *r]),
        ("profile: where the LoRA step's time goes", [sys.executable, "-m", "bench.peers", "--profile", *r]),
        ("profile: one optimizer update alone, BERT-base adapters",
         [sys.executable, "-m", "bench.peers", "--optimizer-updates", "bert-base", *r]),
    ]
    failed = []
    for title, cmd in steps:
        print(f"\n===== {title}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(title)
    if failed:
        raise SystemExit(f"failed: {failed}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=("minilm", "bert-base", "tiny"),
                   help="minilm: the real all-MiniLM-L6-v2 weights; bert-base: BERT-base shape, random weights")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rounds", type=int, default=None, help="default 7 (minilm), 3 (bert-base), 5 with --profile or --optimizer-updates; with --all: the benchmarks' and profiles' rounds")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    p.add_argument("--fwd-steps", type=int, default=4, help="forward passes per timed block")
    p.add_argument("--pause", type=float, default=0.3, help="seconds between blocks")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="default bench/results/peers-<model>.json")
    p.add_argument("--setup-only", action="store_true", help="create the peers venv and exit")
    p.add_argument("--differences", action="store_true",
                   help="only print lora-pro-adamw's definition differences (support/peer_differences.py)")
    p.add_argument("--profile", action="store_true",
                   help="only profile where the LoRA step's time goes (JAX ablation, PyTorch profiler, products)")
    p.add_argument("--optimizer-updates", default=None, choices=("minilm", "bert-base"),
                   help="only time one optimizer update alone on this model's adapter tree")
    p.add_argument("--all", action="store_true",
                   help="everything bench/RESULTS.md reports from this comparison, in order: create the peers "
                        "venv, show lora-pro-adamw's definition differences, run the cross-check tests (fast and "
                        "slow, figures printed), then this benchmark on MiniLM and on BERT-base, then the profiles")
    args = p.parse_args(argv)
    if args.all:
        return run_all(args.rounds)
    if args.setup_only:
        py = ensure_venv()
        print(subprocess.run([str(py), str(WORKER), "--versions"], capture_output=True, text=True).stdout.strip())
        return
    if args.differences:
        raise SystemExit(subprocess.run([str(ensure_venv()), str(DIFFERENCES)]).returncode)
    if args.profile or args.optimizer_updates:
        args.rounds = args.rounds or 5
        if args.profile:
            return profile(args)
        res = optimizer_updates(args.optimizer_updates, rounds=args.rounds)
        print(f"# one optimizer update alone, {args.optimizer_updates} adapters (r 8, all attention/FFN "
              f"Linears), load {os.getloadavg()[0]:.2f}")
        for k, v in res.items():
            print(f"{k:24s} {1e3 * v:8.1f} ms")
        return
    if args.rounds is None:
        args.rounds = 3 if args.model == "bert-base" else 7
    res = benchmark(args)
    table = format_table(res)
    print(table)
    out = Path(args.json or ROOT / "bench" / "results" / f"peers-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res["table"] = table
    out.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
