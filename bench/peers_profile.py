"""Where a LoRA training step's time goes, lora_jax against PEFT (the profile behind the ratios of
bench/peers.py that miss their goals). Same model, batch, rank and adapters as `python -m bench.peers`.

    python -m bench.peers_profile [--model minilm] [--rounds 5]

JAX side: an ablation, each variant jitted and timed alternately (medians):
  forward; "data backward" (value and grad with respect to the LayerNorm scales only: the whole
  backward chain of activations, no weight gradients); LoRA grad (no optimizer); LoRA step;
  full-FT grad (no optimizer); full-FT step; LoRA grad with the tanh GELU instead of erf.
PyTorch side (peers venv): torch.profiler's self-CPU-time table of two PEFT LoRA steps.
Both sides: the four products of one adapted Linear (x@w, dW, grad a, grad b) timed alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import peers

TORCH_PROFILE = r'''
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
import peers_worker as w
spec = json.load(open(sys.argv[1]))
batch, labels = w.load_inputs(spec["inputs"])
model, opt = w.setup_method("lora", spec, spec.get("adapter"))
for _ in range(2):
    w.train_step(model, opt, batch, labels)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(2):
        w.train_step(model, opt, batch, labels)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=38))
import time
def t(f, n=30):
    f(); t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e3
print("# PyTorch products (ms): T x in x out: x@w, dW = xT@dy, grad a = xT@(dy@bT), grad b = (x@a)T@dy")
for (T, i, o) in [(1024, 384, 384), (1024, 384, 1536), (1024, 1536, 384)]:
    x, dy, w, a, b = torch.randn(T, i), torch.randn(T, o), torch.randn(i, o), torch.randn(i, 8), torch.randn(8, o)
    print(f"{T}x{i}x{o}: {t(lambda: x @ w):.3f} {t(lambda: x.T @ dy):.3f} {t(lambda: x.T @ (dy @ b.T)):.3f} {t(lambda: (x @ a).T @ dy):.3f}")
'''


def products() -> list[str]:
    """The products of one adapted Linear (rank 8, MiniLM's shapes, 1024 tokens), jitted alone."""
    import jax
    import jax.numpy as jnp

    def t(f, *a, n=30):
        jax.block_until_ready(f(*a))
        t0 = time.perf_counter()
        for _ in range(n):
            out = f(*a)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / n * 1e3

    rng = np.random.default_rng(0)
    lines = ["# JAX products (ms): T x in x out: x@w, dW = xT@dy, grad a = xT@(dy@bT), grad b = (x@a)T@dy"]
    for (T, i, o) in [(1024, 384, 384), (1024, 384, 1536), (1024, 1536, 384)]:
        x, dy = jnp.asarray(rng.standard_normal((T, i)), jnp.float32), jnp.asarray(rng.standard_normal((T, o)), jnp.float32)
        w, a = jnp.asarray(rng.standard_normal((i, o)), jnp.float32), jnp.asarray(rng.standard_normal((i, 8)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((8, o)), jnp.float32)
        lines.append(f"{T}x{i}x{o}: {t(jax.jit(lambda x, w: x @ w), x, w):.3f} {t(jax.jit(lambda x, dy: x.T @ dy), x, dy):.3f} "
                     f"{t(jax.jit(lambda x, dy, b: x.T @ (dy @ b.T)), x, dy, b):.3f} "
                     f"{t(jax.jit(lambda x, a, dy: (x @ a).T @ dy), x, a, dy):.3f}")
    return lines


def optimizer_updates(kind: str = "bert-base", rounds: int = 5) -> dict[str, float]:
    """Seconds of one optimizer update alone (jitted by itself) on `kind`'s adapter tree:
    optax.adamw, lora_pro() + adamw, lora_pro_adamw."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax
    from train import bert

    cfg = bert.BertConfig() if kind == "bert-base" else bert.load_hf_safetensors(
        __import__("train.assets", fromlist=["x"]).minilm_dir(), with_pooler=True)[0]
    model, v = bert.init_classifier(cfg, 2, jax.random.key(0), pooling="pooler")
    ad = lora_jax.apply(v["params"], 8, alpha=16, targets=bert.LORA_TARGETS)
    tr, _ = lora_jax.split(ad, trainable="^head/")
    tr = jax.tree_util.tree_map(lambda x: x + 0.01, tr)
    g = jax.tree_util.tree_map(lambda x: 0.01 * jnp.ones_like(x), tr)
    out = {}
    for name, opt in (("optax.adamw", optax.adamw(1e-4)),
                      ("lora_pro() + adamw", optax.chain(lora_jax.lora_pro(), optax.adamw(1e-4))),
                      ("lora_pro_adamw", lora_jax.lora_pro_adamw(1e-4))):
        st = opt.init(tr)
        f = jax.jit(lambda g, st, p, opt=opt: opt.update(g, st, p))
        jax.block_until_ready(f(g, st, tr))
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(f(g, st, tr))
            ts.append(time.perf_counter() - t0)
        out[name] = float(np.median(ts))
    return out


def main(argv=None):
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm", choices=("minilm", "bert-base", "tiny"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizer-updates", default=None, choices=("minilm", "bert-base"),
                   help="only time one optimizer update alone on this model's adapter tree, and exit")
    args = p.parse_args(argv)
    if args.optimizer_updates:
        res = optimizer_updates(args.optimizer_updates, rounds=args.rounds)
        print(f"# one optimizer update alone, {args.optimizer_updates} adapters (r 8, all attention/FFN "
              f"Linears), load {__import__('os').getloadavg()[0]:.2f}")
        for k, v in res.items():
            print(f"{k:24s} {1e3 * v:8.1f} ms")
        return
    tmp = Path(tempfile.mkdtemp(prefix="lora_jax_peers_prof_"))
    case = peers.make_case(args.model, tmp)
    b = peers.jax_batch(case)
    model = case.model
    tr, fr = lora_jax.split(case.adapted, trainable=r"^head/")
    fwd = lora_jax.wrap(model.apply)

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    def lora_loss(tr, m=model):
        f = lora_jax.wrap(m.apply)
        return ce(f({"params": lora_jax.combine(tr, fr)}, b["input_ids"], b["attention_mask"], b["token_type_ids"]))

    def full_loss(p):
        return ce(model.apply({"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"]))

    ln_sel = lambda path, leaf: "LayerNorm" in path and path.endswith("scale")
    ln_tr, ln_fr = lora_jax.split(case.params, trainable=ln_sel)
    ln_tr = jax.tree_util.tree_map(lambda x: x, ln_tr)

    def data_bwd(ln_tr):
        return full_loss(lora_jax.combine(ln_tr, ln_fr))

    gelu_tanh = dataclasses.replace(model, config=dataclasses.replace(model.config, hidden_act="gelu_new"))

    lora_step, lora_state, _ = peers.make_jax_method(case, "jax_lora")
    full_step, full_state, _ = peers.make_jax_method(case, "jax_full")
    fns = {
        "forward (base)": (jax.jit(lambda p: model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                                         b["token_type_ids"])), (case.params,)),
        "forward (unmerged LoRA)": (jax.jit(lambda t: fwd({"params": lora_jax.combine(t, fr)}, b["input_ids"],
                                                          b["attention_mask"], b["token_type_ids"])), (tr,)),
        "data backward (grad of LN scales only)": (jax.jit(jax.value_and_grad(data_bwd)), (ln_tr,)),
        "LoRA value_and_grad": (jax.jit(jax.value_and_grad(lora_loss)), (tr,)),
        "LoRA value_and_grad, tanh GELU": (jax.jit(jax.value_and_grad(lambda t: lora_loss(t, gelu_tanh))), (tr,)),
        "full FT value_and_grad": (jax.jit(jax.value_and_grad(full_loss)), (case.params,)),
    }
    times = {k: [] for k in [*fns, "LoRA step (adamw)", "full FT step (adamw)"]}
    for fn, a in fns.values():
        jax.block_until_ready(fn(*a))
    for st, step in ((lora_state, lora_step), (full_state, full_step)):
        st[0], st[1], _ = step(st[0], st[1], st[2], b)
    for r in range(args.rounds):
        for k, (fn, a) in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = fn(*a)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / args.steps)
        for k, st, step in (("LoRA step (adamw)", lora_state, lora_step), ("full FT step (adamw)", full_state, full_step)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                st[0], st[1], loss = step(st[0], st[1], st[2], b)
            jax.block_until_ready(loss)
            times[k].append((time.perf_counter() - t0) / args.steps)
    print(f"# JAX ablation, {args.model}, batch {case.batch['input_ids'].shape}, r {case.rank}; "
          f"medians of {args.rounds} rounds; load {__import__('os').getloadavg()[0]:.2f}")
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:44s} {1e3 * v:8.1f} ms")
    prod = products()
    print("\n" + "\n".join(prod))
    py = peers.peers_python()
    torch_table = None
    if py is not None:
        spec = peers.worker_spec(case, "profile", tmp / "x.npz", lr=1e-4, weight_decay=0.0)
        (tmp / "spec.json").write_text(json.dumps(spec))
        (tmp / "prof.py").write_text(TORCH_PROFILE)
        r = subprocess.run([str(py), str(tmp / "prof.py"), str(tmp / "spec.json"), str(peers.ROOT / "bench")],
                           capture_output=True, text=True)
        torch_table = r.stdout if r.returncode == 0 else r.stderr[-2000:]
        print("\n# PyTorch: PEFT LoRA step, torch.profiler (2 steps)\n" + torch_table)
    out = peers.ROOT / "bench" / "results" / f"peers-profile-{args.model}.json"
    out.write_text(json.dumps({"median_s": med, "times_s": times, "jax_products": prod, "torch_profile": torch_table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
