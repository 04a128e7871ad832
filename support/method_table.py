"""The LoRA-Pro paper's method comparison in miniature (`bench.method_table` is its command line):
the methods as `train.classify` flags, their lr grids, the sweep per dataset (`support.lr_grid`)
and the report (``bench/results/method_table.json`` and the section of bench/RESULTS.md).

Gap closure of a method m on a dataset: ``(x_m − x_LoRA) / (x_full − x_LoRA)`` with x the mean over
seeds of held-out accuracy (and the same with held-out loss): 1 = as good as full FT, 0 = as LoRA,
< 0 worse than LoRA. With a gap within two standard errors of 0 the fraction is not resolved, and
the table says so rather than print a ratio of noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
from pathlib import Path

import numpy as np

from support import lr_grid
from support.runs import load_runs, mean_std, train_run, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECTION = "## The LoRA-Pro paper's method comparison in miniature (MiniLM, two classification tasks)"
DATASETS = ("lora_jax_movie_reviews", "lora_jax_tweets")

# method name -> (train.classify flags, what it is)
METHODS = {
    "full": (["--method", "full"], "full fine-tuning (AdamW)"),
    "lora": (["--method", "lora"], "LoRA (Kaiming a, zero b, α/r)"),
    "pissa": (["--method", "lora", "--init", "pissa"], "PiSSA init (top singular directions of W)"),
    "rslora": (["--method", "lora", "--rslora"], "rsLoRA (scale α/√r)"),
    "lora-plus": (["--method", "lora-plus", "--loraplus-ratio", "16"], "LoRA+ (b's lr 16×)"),
    "dora": (["--method", "dora"], "DoRA (trained magnitude per output unit)"),
    "lora-ga": (["--method", "lora", "--init", "lora-ga", "--ga-batches", "8"],
                "LoRA-GA init (mean full gradient of 8 batches; PEFT's formulas)"),
    "riemannian": (["--method", "riemannian"], "Riemannian preconditioner (λ 1e-2) + AdamW"),
    "lora-pro": (["--method", "lora-pro"], "LoRA-Pro efficient (lora_pro + AdamW)"),
    "lora-pro-adamw": (["--method", "lora-pro-adamw"], "LoRA-Pro full (Algorithm 2)"),
}
# half-decade exponents k (lr 10^(k/2)), 3 per method, centred on the choices of a pilot sweep on the
# movie reviews (2026-12-03, cut off after 51 runs; its extensions are what moved these): LoRA's usual
# range for LoRA and LoRA-GA's and PiSSA's nonzero starts one step lower; full FT and Algorithm 2
# (which steps on full FT's scale) on full FT's scale; DoRA, the Riemannian preconditioner and the
# efficient LoRA-Pro half a decade above LoRA (the pilot chose their top lr); the grid still extends
# past an end the choice lands on
GRIDS = {"full": (-8, -7, -6), "lora": (-7, -6, -5), "pissa": (-7, -6, -5), "rslora": (-7, -6, -5),
         "lora-plus": (-7, -6, -5), "dora": (-6, -5, -4), "lora-ga": (-7, -6, -5), "riemannian": (-6, -5, -4),
         "lora-pro": (-6, -5, -4), "lora-pro-adamw": (-9, -8, -7)}
RUN_NAME = re.compile(r"^(?P<method>.+)-lr(?P<lr>[0-9.e+-]+)-s(?P<seed>\d+)$")


def run_args(a, method: str, lr: float, seed: int, dataset: str) -> list[str]:
    """The `train.classify` flags of one run."""
    return [*METHODS[method][0], "--model", a.model, "--dataset", dataset, "--lr", repr(lr), "--seed", str(seed),
            "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--rank", "8", "--alpha", "16",
            "--max-len", str(a.max_len), "--train-limit", str(a.train_limit), "--val-limit", str(a.val_limit),
            "--eval-limit", str(a.eval_limit), "--warmup-ratio", "0.1", "--schedule", "cosine",
            "--weight-decay", "0", "--clip-norm", "1.0", "--eval-every", str(10 ** 9),
            "--ckpt-every", str(a.ckpt_every), "--keep", "1", "--quiet", "--no-plot"]


def sweep(a) -> dict[str, dict[str, int]]:
    """Every dataset's sweep (`support.lr_grid.sweep`); the chosen k per dataset and method."""
    return {ds: lr_grid.sweep("classify", Path(a.out) / ds, {m: GRIDS[m] for m in a.methods},
                              lambda m, lr, seed, first, ds=ds: run_args(a, m, lr, seed, ds), a.seeds,
                              dry_run=a.dry_run, train=lambda *args, **kw: train_run(*args, **kw))
            for ds in a.datasets}


def collect(out: Path, methods) -> dict:
    """Per method (by run name, since several share a trainer method): `support.lr_grid.collect`."""
    def method_of(r):
        m = RUN_NAME.match(r["name"])
        return m["method"] if m else None
    return lr_grid.collect(out, methods, method_of)


def closure(per: dict, key: str) -> dict:
    """Per method: gap closure on `key` from the seed means, and whether the gap is resolved
    (|full − LoRA| > 2 standard errors of that difference, over seeds)."""
    if "full" not in per or "lora" not in per:
        return {}
    xs = {m: np.array([r[key] for r in d["seeds"]], float) for m, d in per.items()}
    gap = xs["full"].mean() - xs["lora"].mean()
    se = np.sqrt(xs["full"].var(ddof=1) / len(xs["full"]) + xs["lora"].var(ddof=1) / len(xs["lora"])) \
        if min(len(xs["full"]), len(xs["lora"])) > 1 else float("nan")
    resolved = bool(abs(gap) > 2 * se)
    return {"gap": float(gap), "gap_se": float(se), "resolved": resolved,
            "methods": {m: {"minus_lora": float(x.mean() - xs["lora"].mean()),
                            "closure": float((x.mean() - xs["lora"].mean()) / gap) if gap else None}
                        for m, x in xs.items()}}


def report(a) -> str:
    """Write ``bench/results/method_table.json`` and the RESULTS.md section; return the section."""
    import jax
    import optax

    js = {"command": "python -m bench.method_table", "steps": a.steps, "batch_size": a.batch_size,
          "train_limit": a.train_limit, "val_limit": a.val_limit, "eval_limit": a.eval_limit, "datasets": {}}
    lines = [SECTION, "",
             f"`python -m bench.method_table` ({datetime.date.today().isoformat()}; {platform.machine()}, "
             f"{__import__('os').cpu_count()} CPU cores; jax {jax.__version__}, optax {optax.__version__}). "
             f"all-MiniLM-L6-v2, r 8, α 16 on the attention and FFN kernels of all 6 layers, {a.steps} steps of "
             f"batch {a.batch_size} from the first {a.train_limit} training sentences, warmup 10% then cosine, "
             f"weight decay 0, clipping at global norm 1.0. Each method's lr (half a decade apart, ≥ 3 values) is "
             f"chosen on validation accuracy over the {a.val_limit} training sentences after those (ties: "
             f"validation loss), extended past an end until the choice is inside; then seeds "
             f"{', '.join(map(str, a.seeds))} at it. Held-out: the first {a.eval_limit} test examples. Gap closure: "
             f"(method − LoRA) / (full − LoRA) of the seed means; '—' where the full-vs-LoRA gap is within 2 "
             f"standard errors (not resolved).", ""]
    for ds in a.datasets:
        per = collect(Path(a.out) / ds, a.methods)
        acc, loss = closure(per, "eval_acc"), closure(per, "eval_loss")
        js["datasets"][ds] = {"methods": {m: {
            "lr_grid": [r["lr"] for r in d["grid"]], "chosen_lr": d["chosen"]["lr"], "chosen_inside": d["inside"],
            "seeds": [{"seed": r["seed"], "eval_acc": r["eval_acc"], "eval_loss": r["eval_loss"],
                       "val_acc": r.get("val_acc"), "train_loss": r.get("train_loss_last10pct"),
                       "wall_s": r.get("wall_s")} for r in d["seeds"]]} for m, d in per.items()},
            "gap_closure": {"eval_acc": acc, "eval_loss": loss}}
        lines += [f"### {ds}", "", "| method | lrs tried (seed 0) | chosen lr | held-out acc | held-out loss "
                  "| gap closed (acc) | gap closed (loss) |", "|---|---|---|---|---|---|---|"]
        for m, d in per.items():
            def frac(c):
                if not c or m in ("full", "lora"):
                    return ""
                v = c["methods"][m]["closure"]
                return "—" if not c["resolved"] or v is None else f"{v:+.2f}"
            tried = ", ".join(f"{r['lr']:g}" for r in d["grid"])
            lines.append(f"| {METHODS[m][1]} | {tried} | "
                         f"{d['chosen']['lr']:g}{'' if d['inside'] else ' (at an end)'} | "
                         f"{mean_std([r['eval_acc'] for r in d['seeds']])} (n={len(d['seeds'])}) | "
                         f"{mean_std([r['eval_loss'] for r in d['seeds']])} | {frac(acc)} | {frac(loss)} |")
        if acc:
            lines += ["", f"Full − LoRA: accuracy {acc['gap']:+.4f} (se {acc['gap_se']:.4f}), loss "
                      f"{loss['gap']:+.4f} (se {loss['gap_se']:.4f})."]
        lines.append("")
    every = [r for ds in a.datasets for r in load_runs(Path(a.out) / ds)]
    wall = sum(r.get("run_wall_s") or 0.0 for r in every)
    js["runs"], js["run_wall_s_total"] = len(every), wall
    lines += [f"Budget: {len(every)} runs, {wall / 60:.0f} min of their processes' wall time in all (start-up, "
              f"data, compilation, training and evaluation; resumed runs count their last process only), "
              f"on {__import__('os').cpu_count()} CPU cores.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "method_table.json").write_text(json.dumps(js, indent=1))
    text = "\n".join(lines)
    write_section(ROOT / "bench" / "RESULTS.md", SECTION, text)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.method_table",
                                 description="The LoRA-Pro paper's method table in miniature (bench/method_table.py)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "method-table"))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--train-limit", type=int, default=1600)
    ap.add_argument("--val-limit", type=int, default=400)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--ckpt-every", type=int, default=30, help="so that a run cut off resumes")
    ap.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do")
    ap.add_argument("--summarise", action="store_true", help="only the report, from finished runs")
    return ap.parse_args(argv)
