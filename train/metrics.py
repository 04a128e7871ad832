"""What a run reports: sizes of parameter trees, the ``metrics.jsonl`` file and the loss plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

from lora_jax import is_quantized


def nbytes(tree) -> int:
    """Bytes of the arrays of `tree` (quantized weights: their stored blocks)."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree)))


def count(tree) -> int:
    """Elements of the arrays of `tree` (a quantized weight: those of its logical shape)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=is_quantized)))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Lines of a metrics.jsonl (a torn last line, from a killed process, is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_lines_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _loss_curves(out: Path) -> list[tuple[str, str, list[dict]]]:
    """(method, run name, records with a loss) of every run under `out`."""
    runs = []
    for m in sorted(out.glob("*/metrics.jsonl")):
        cfg_file = m.parent / "config.json"
        method = json.loads(cfg_file.read_text()).get("method", m.parent.name) if cfg_file.is_file() else m.parent.name
        recs = [r for r in read_metrics(m) if "loss" in r]
        if recs:
            runs.append((method, m.parent.name, recs))
    return runs


def plot_runs(out: str | os.PathLike, path: str | os.PathLike | None = None, smooth: int = 20) -> Path | None:
    """One PNG with the (moving-average) training-loss curves of every run under `out`, coloured
    by method. Returns its path, or None if there is nothing to plot.

    Drawn on a `matplotlib.figure.Figure` of its own, not through pyplot, so the caller's backend
    (a notebook's inline one) and open figures are left alone."""
    out = Path(out)
    runs = _loss_curves(out)
    if not runs:
        return None
    colors: dict[str, str] = {}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for method, name, recs in runs:
        steps = np.array([r["step"] for r in recs])
        loss = np.array([r["loss"] for r in recs])
        w = max(1, min(smooth, len(loss)))
        ma = np.convolve(loss, np.ones(w) / w, mode="valid")
        first = method not in colors  # one legend entry per method (seeds share its colour)
        color = colors.setdefault(method, f"C{len(colors)}")
        ax.plot(steps[w - 1:], ma, color=color, alpha=0.8, lw=1.3, label=method if first else None)
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (moving average of {smooth} steps)")
    ax.set_title(f"training loss, runs in {out.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path) if path is not None else out / "loss.png"
    fig.savefig(path, dpi=110)
    return path
