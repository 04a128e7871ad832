"""What each LoRA method does with the full gradient, measured on the real model along the chosen-lr
runs of `bench.lm_sweep` (``python -m bench.lm_sweep --mechanism`` runs `main`).

For LoRA, LoRA-Pro efficient and LoRA-Pro full (Algorithm 2), the seed-0 run at the method's chosen
lr is replayed in this process with `train.lm`'s own setup, optimizer and train step (the same
batches and keys; the replay's losses are compared with the run's log). At steps 0, N/3, 2N/3 and
N−1, before the update, on that step's batch:

* g = ∂L/∂K, the full gradient of every adapted kernel K = K0 + s·a b (at the merged weights);
* (ga, gb) = LoRA's gradients (the trainer's autodiff through `lora_jax.wrap`), and two equivalent
  gradients: LoRA's ``g̃ = s·(ga b + a gb)`` (`lora_jax.equivalent_kernel_gradient`) and LoRA-Pro's,
  the same of the adjusted pair (`lora_jax.adjust_matrices`): the projection of g onto the
  adapters' tangent space. Each: ‖g̃ − g‖/‖g‖ and cos(g̃, g), averaged over the adapted weights.
  Both are shown at every method's points; the method's own is LoRA's for LoRA, the projection for
  the two LoRA-Pro modes (Algorithm 2 feeds it to its full-shape Adam);
* after the update: the change actually applied, ``ΔK = s·(a'b' − a b)``, its cosine with −g, and
  for Algorithm 2 its cosine with, and norm relative to, the full-shape AdamW step ``−lr_t·M̂/(√V̂+ε)``
  built from its own moments after this update — full FT's AdamW step on the projected gradients,
  which the projection then cuts back to the tangent space.

Raw (unclipped) gradients: clipping scales all of them by one factor, which leaves every cosine and
ratio above unchanged except LoRA's ‖g̃ − g‖/‖g‖ (LoRA's g̃ is not on g's scale anyway: s²-sized
Gram factors multiply it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.gram import node_matrices
from lora_jax.paths import flatten_with_paths

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
METHODS = ("lora", "lora-pro", "lora-pro-adamw")


def _nodes(tree):
    return [(p, x) for p, x in flatten_with_paths(tree, is_leaf=lora_jax.is_lora)[0] if lora_jax.is_lora(x)]


def _cos(x, y):
    return jnp.vdot(x, y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y))


@jax.jit
def _gradient_figures(nodes, grads, gfull):
    """Per node: (rel err, cos) of LoRA's equivalent gradient and of the projection, against g."""
    out = []
    for p, u, g in zip(nodes, grads, gfull):
        a, b = node_matrices(p.a, p.b, p.roles)
        ga, gb = node_matrices(u.a, u.b, p.roles)
        g = g.reshape(a.shape[:-1] + b.shape[-1:]).astype(jnp.float32)
        eq = lora_jax.equivalent_kernel_gradient(a, b, ga, gb, p.scale)
        pa, pb = lora_jax.adjust_matrices(a, b, ga, gb, p.scale)
        proj = lora_jax.equivalent_kernel_gradient(a, b, pa, pb, p.scale)
        gn = jnp.linalg.norm(g)
        out.append(jnp.stack([jnp.linalg.norm(eq - g) / gn, _cos(eq, g), jnp.linalg.norm(proj - g) / gn, _cos(proj, g)]))
    return jnp.stack(out)


@jax.jit
def _update_figures(old, new, gfull, adam_steps):
    """Per node: cos(ΔK, −g), and (Algorithm 2) cos(ΔK, AdamW step), ‖ΔK‖/‖AdamW step‖."""
    out = []
    for i, (p, q, g) in enumerate(zip(old, new, gfull)):
        a, b = node_matrices(p.a, p.b, p.roles)
        a2, b2 = node_matrices(q.a, q.b, p.roles)
        dk = p.scale * (a2 @ b2 - a @ b)
        g = g.reshape(dk.shape).astype(jnp.float32)
        row = [_cos(dk, -g)]
        if adam_steps is not None:
            step = adam_steps[i]
            row += [_cos(dk, step), jnp.linalg.norm(dk) / jnp.linalg.norm(step)]
        out.append(jnp.stack(row))
    return jnp.stack(out)


def _adam_steps(opt_state, lr):
    """Algorithm 2's full-shape AdamW step ``−lr·M̂/(√V̂+ε)`` per node, from its state (β, ε the
    defaults `train.optim` uses)."""
    st = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, lora_jax.LoraProAdamWState))
          if isinstance(x, lora_jax.LoraProAdamWState)]
    (st,) = st
    t = st.count.astype(jnp.float32)
    bc1, bc2 = 1 - 0.9 ** t, 1 - 0.999 ** t
    return [-lr * (m / bc1) / (jnp.sqrt(v / bc2) + 1e-8) for m, v in zip(jax.tree.leaves(st.mu), jax.tree.leaves(st.nu))]


def replay(a, method: str, lr: float, run_dir: Path) -> dict:
    """The figures of one method's chosen-lr seed-0 run (see the module docstring)."""
    from support.lm_fidelity import run_args
    from train import arith, lm, loop
    from train.task import combined
    args = lm.parse_args(run_args(a, method, lr, 0))
    setup = lm.build(args, lm.resolve_model(args.model))
    probs = arith.problems("train", args.train_limit, args.data_seed)
    data = arith.encode(setup.tokenizer, probs, arith.longest_example(setup.tokenizer, probs),
                        pad_id=arith.end_of_turn_id(setup.tokenizer))
    order = loop.BatchOrder(args.seed, len(data["input_ids"]), args.batch_size)
    train_step, _ = lm.make_steps(setup, method)
    wrapped = lora_jax.wrap(setup.model.apply)
    lora_grad = jax.jit(jax.grad(lambda tr, fr, batch, key: lm.TASK.loss(wrapped, combined(tr, fr), batch, key)))
    full_grad = jax.jit(jax.grad(lambda w, batch, key: lm.TASK.loss(setup.model.apply, w, batch, key)))
    tr, fr, opt_state = setup.trainable, setup.frozen, setup.optimizer.init(setup.trainable)
    n = args.steps
    probes = sorted({0, n // 3, (2 * n) // 3, n - 1})
    logged = {r["step"]: r["loss"] for r in _read(run_dir / "metrics.jsonl") if "loss" in r}
    points, losses = [], {}
    for step in range(n):
        batch = {k: jnp.asarray(data[k][order.indices(step)]) for k in lm.KEYS}
        key = loop.step_key(args.seed, step)
        if step in probes:
            merged = lora_jax.merge(lora_jax.combine(tr, fr))
            paths = [p for p, _ in _nodes(tr)]
            gw = dict(flatten_with_paths(full_grad(merged, batch, key))[0])
            gfull = [gw[p + "/kernel"] if p + "/kernel" in gw else gw[p] for p in paths]
            grads = [u for _, u in _nodes(lora_grad(tr, fr, batch, key))]
            old = [jax.tree.map(jnp.copy, x) for _, x in _nodes(tr)]  # the step donates tr's buffers
            gfig = np.asarray(_gradient_figures(old, grads, gfull))
        new_tr, opt_state, loss = train_step(tr, opt_state, fr, batch, key)
        losses[step + 1] = float(loss)  # the log counts updates: its step 1 is the first one
        if step in probes:
            steps_ = _adam_steps(opt_state, float(setup.schedule(step))) if method == "lora-pro-adamw" else None
            ufig = np.asarray(_update_figures(old, [x for _, x in _nodes(new_tr)], gfull, steps_))
            points.append(_point(step, gfig, ufig, method))
            print(f"[{method}] step {step}: {points[-1]}", flush=True)
        tr = new_tr
    both = sorted(set(losses) & set(logged))
    diff = max(abs(losses[s] - logged[s]) for s in both) if both else None
    return {"lr": lr, "steps": n, "points": points, "replay_vs_log_max_abs_loss_diff": diff,
            "replayed_steps": len(losses), "logged_steps_compared": len(both), "n_weights": len(old)}


def _point(step, gfig, ufig, method) -> dict:
    d = {"step": step, "lora_eq_rel_err": gfig[:, 0].mean(), "lora_eq_cos": gfig[:, 1].mean(),
         "projection_rel_err": gfig[:, 2].mean(), "projection_cos": gfig[:, 3].mean(),
         "update_cos_neg_g": ufig[:, 0].mean()}
    if method == "lora-pro-adamw":
        d.update(update_cos_adamw_step=ufig[:, 1].mean(), update_norm_over_adamw_step=ufig[:, 2].mean())
    return {k: (float(v) if k != "step" else int(v)) for k, v in d.items()}


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def main(a) -> dict:
    from support.lm_report import collect
    per = collect(Path(a.out), METHODS)
    res = {"methods": {}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for m in METHODS:
        if m not in per:
            print(f"[{m}] no finished grid: skipped")
            continue
        run = per[m]["seeds"][0] if per[m]["seeds"][0]["seed"] == 0 else per[m]["chosen"]
        res["methods"][m] = replay(a, m, run["lr"], Path(run["run_dir"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_mechanism.json").write_text(json.dumps(res, indent=1))
    print("\n".join(markdown_lines(res)))
    return res


def markdown_lines(res: dict) -> list[str]:
    """The mechanism table for bench/RESULTS.md."""
    label = {"lora": "LoRA", "lora-pro": "LoRA-Pro efficient", "lora-pro-adamw": "LoRA-Pro full (Alg. 2)"}
    lines = [f"Mechanism (`python -m bench.lm_sweep --mechanism`, {res['date']}; `support/lm_mechanism.py` says what "
             f"each column is): each method's seed-0 run at its chosen lr, replayed; means over the "
             f"{next(iter(res['methods'].values()))['n_weights'] if res['methods'] else 0} adapted weights of the "
             f"full gradient g = ∂L/∂K on each step's batch. \"LoRA g̃\": s·(ga b + a gb); \"projection\": LoRA-Pro's "
             f"equivalent gradient; ΔK: the change the step applied; AdamW step: −lr·M̂/(√V̂+ε) from Algorithm 2's "
             f"own full-shape moments.", "",
             "| run | step | LoRA g̃: ‖g̃−g‖/‖g‖ | LoRA g̃: cos | projection: ‖g̃−g‖/‖g‖ | projection: cos | "
             "cos(ΔK, −g) | cos(ΔK, AdamW step) | ‖ΔK‖/‖AdamW step‖ |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        for p in r["points"]:
            extra = (f"{p['update_cos_adamw_step']:.3f} | {p['update_norm_over_adamw_step']:.3f}"
                     if "update_cos_adamw_step" in p else "– | –")
            lines.append(f"| {label[m]} (lr {r['lr']:g}) | {p['step']} | {p['lora_eq_rel_err']:.3g} | "
                         f"{p['lora_eq_cos']:.3f} | {p['projection_rel_err']:.3f} | {p['projection_cos']:.3f} | "
                         f"{p['update_cos_neg_g']:.3f} | {extra} |")
    lines += ["", "Replays against the runs' logs (max |loss difference| over the steps): " + ", ".join(
        f"{label[m]} {r['replay_vs_log_max_abs_loss_diff']:.2e}" for m, r in res["methods"].items()
        if r["replay_vs_log_max_abs_loss_diff"] is not None) + ".", ""]
    return lines
