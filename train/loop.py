"""The training machinery shared by `train.classify` and `train.lm`.

A trainer builds its model, its trainable/frozen halves and a jitted ``train_step(tr, opt_state,
frozen, batch, key) -> (tr, opt_state, loss)``; this module does the rest the same way for both:

* command line: the common flags (`add_common_args`), their validation before anything loads
  (`NUMERIC_RULES`, `check_numeric`) and `ConfigError` for bad input;
* optimizers: `make_schedule` (linear warmup, then cosine to 0 or constant) and `make_optimizer`
  for the methods ``full``/``probe``/``lora`` (AdamW), ``lora-pro`` (``optax.chain(lora_jax.lora_pro(),
  optax.adamw(lr))``) and ``lora-pro-adamw`` (`lora_jax.lora_pro_adamw`);
* deterministic batches: `BatchOrder` — batch k is rows ``perm_e[j·B:(j+1)·B]`` with
  ``e, j = divmod(k, N // B)`` and ``perm_e`` a permutation drawn from ``(seed, e)``; the step key
  of step k is ``fold_in(fold_in(key(seed), 2), k)``. So a run resumed at step k replays the
  uninterrupted run bit for bit;
* the run directory (`prepare_run_dir`: ``--resume`` / ``--overwrite``), orbax checkpoints of the
  trainable half and the optimizer state (`open_run` restores the latest and refuses one written with
  other trajectory settings), ``metrics.jsonl`` (`read_metrics`), the tqdm progress bar, the loop
  itself (`train_loop`) and the loss plot of every run in ``--out`` (`plot_runs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

LORA_METHODS = ("lora", "lora-pro", "lora-pro-adamw")


class ConfigError(ValueError):
    """Bad command-line input (unknown names, targets matching nothing, ...)."""


# ----------------------------------------------------------------------------------------------
# arguments



def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a trainer's ``main(argv)`` as a command: bad input (`ConfigError`,
    `train.assets.AssetError`, `train.checkpoint.CheckpointError`) becomes one line on stderr and
    exit status 2, not a traceback."""
    from train.assets import AssetError
    from train.checkpoint import CheckpointError

    try:
        main(argv)
    except (ConfigError, AssetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

def add_common_args(p: argparse.ArgumentParser, *, methods, default_lr: dict, targets_help: str,
                    steps: int = 300, batch_size: int = 32, eval_every: int = 100, out: str = "runs/run") -> None:
    """The flags every trainer has (method, LoRA shape, schedule, seeds, limits, checkpoints, output)."""
    p.add_argument("--method", default="lora", choices=methods)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=None, help=targets_help)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per method: {default_lr})")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out examples")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint interval (steps); 0: only at the end")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--out", default=out)
    p.add_argument("--name", default=None, help="run directory name (default: <method>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# (flag, test, what it must be): every numeric flag is checked before anything loads; a trainer
# without one of these flags skips its rule
NUMERIC_RULES = [
    *((name, lambda v: v >= 1, ">= 1") for name in (
        "steps", "batch_size", "eval_every", "max_len", "eval_batch_size", "rank", "keep",
        "train_limit", "eval_limit", "train_size", "max_new_tokens")),
    ("lr", lambda v: v > 0, "> 0"),
    ("alpha", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ckpt_every", lambda v: v >= 0, ">= 0"),
    ("train_eval_limit", lambda v: v >= 0, ">= 0"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("data_seed", lambda v: v >= 0, ">= 0"),
]


def check_numeric(args: argparse.Namespace, rules=NUMERIC_RULES) -> None:
    """Raise `ConfigError` naming the first numeric flag outside its range (NaN included)."""
    for name, ok, rule in rules:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


# ----------------------------------------------------------------------------------------------
# optimizer


def nbytes(tree) -> int:
    import jax

    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def make_schedule(args):
    """Linear warmup over ``warmup_ratio·steps``, then cosine decay to 0 at ``steps`` (or constant)."""
    import optax

    if args.schedule == "constant":
        warm = int(round(args.warmup_ratio * args.steps))
        if warm == 0:
            return optax.constant_schedule(args.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, args.lr, warm), optax.constant_schedule(args.lr)], [warm])
    warm = int(round(args.warmup_ratio * args.steps))
    return optax.warmup_cosine_decay_schedule(0.0, args.lr, warm, max(args.steps, warm + 1), end_value=0.0)


def make_optimizer(method: str, schedule, weight_decay: float, compute_dtype=None):
    """The method's optimizer; `compute_dtype` is LoRA-Pro's (float32 by default; float64 for a
    float64 model, so that nothing in the step rounds to float32)."""
    import optax

    import lora_jax

    if method == "lora-pro-adamw":  # non-LoRA leaves get AdamW inside
        return lora_jax.lora_pro_adamw(schedule, weight_decay=weight_decay, compute_dtype=compute_dtype)
    adamw = optax.adamw(schedule, weight_decay=weight_decay)
    if method == "lora-pro":
        return optax.chain(lora_jax.lora_pro(compute_dtype=compute_dtype), adamw)
    return adamw


_STEP_CACHE: dict = {}


def memo_steps(cache_key, make: Callable[[], Any]):
    """``make()``, shared by runs of one process that give the same `cache_key` (same model, method
    and optimizer settings: the seeds of a benchmark), so their jitted steps compile once."""
    if cache_key is None:
        return make()
    if cache_key not in _STEP_CACHE:
        _STEP_CACHE[cache_key] = make()
    return _STEP_CACHE[cache_key]


# ----------------------------------------------------------------------------------------------
# batches


class BatchOrder:
    """Batch k of a run: a pure function of (seed, k) (see the module docstring)."""

    def __init__(self, seed: int, n: int, batch_size: int):
        if n < batch_size:
            raise ConfigError(f"the training split has {n} examples, fewer than --batch-size {batch_size}")
        self.seed, self.n, self.bs = seed, n, batch_size
        self.per_epoch = n // batch_size
        self._epoch, self._perm = None, None

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, j = self.position(step)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm[j * self.bs:(j + 1) * self.bs]


# ----------------------------------------------------------------------------------------------
# metrics files and plot


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


def plot_runs(out: str | os.PathLike, path: str | os.PathLike | None = None, smooth: int = 20) -> Path | None:
    """One PNG with the (moving-average) training-loss curves of every run under `out`, coloured
    by method. Returns its path, or None if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    runs = []
    for m in sorted(out.glob("*/metrics.jsonl")):
        cfg_file = m.parent / "config.json"
        method = json.loads(cfg_file.read_text()).get("method", m.parent.name) if cfg_file.is_file() else m.parent.name
        recs = [r for r in read_metrics(m) if "loss" in r]
        if recs:
            runs.append((method, m.parent.name, recs))
    if not runs:
        return None
    colors: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the run


def is_primary() -> bool:
    from train.parallel import is_primary as primary

    return primary()


def sync(name: str) -> None:
    from train.parallel import sync as barrier

    barrier(name)


def prepare_run_dir(args) -> Path:
    """``--out/<name>`` (name: ``<method>-s<seed>`` unless ``--name``); an existing non-empty one
    needs ``--resume`` or ``--overwrite`` (which deletes it)."""
    run_dir = Path(args.out) / (args.name or f"{args.method}-s{args.seed}")
    if run_dir.exists() and not args.resume:
        if args.overwrite:
            sync("prepare_run_dir:check")  # every process has looked before process 0 deletes
            if is_primary():
                shutil.rmtree(run_dir)
        elif any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it or "
                              f"--overwrite to start again")
    sync("prepare_run_dir")
    return run_dir



@dataclasses.dataclass
class Run:
    """An opened run: where it writes, its checkpointer, and the state to start from."""

    args: Any
    run_dir: Path
    config: dict
    ckpt: Any  # train.checkpoint.Checkpointer
    tr: Any
    opt_state: Any
    start: int

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def open_run(args, run_dir: Path, config: dict, trajectory, tr, opt_state) -> Run:
    """Open the run's checkpoints; with ``--resume`` restore the latest finalized one (refusing one
    written with other values of the `trajectory` keys of `config`) and drop the metrics logged
    after it. Writes ``config.json``."""
    from train.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "ckpt", every=args.ckpt_every or args.steps, keep=args.keep)
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if args.resume:
        step0 = ckpt.latest_step()
        if step0 is None:
            sync("open_run:none")
            if is_primary():
                print(f"--resume: no finalized checkpoint in {ckpt.directory}; starting at step 0", file=sys.stderr)
                if metrics_path.exists():
                    metrics_path.unlink()
        else:
            (tr, opt_state), meta = ckpt.restore((tr, opt_state), step0)
            diff = {k: (meta["config"].get(k), config[k]) for k in trajectory if meta["config"].get(k) != config[k]}
            if diff:
                raise ConfigError(f"--resume: checkpoint {ckpt.step_dir(step0)} was written with other "
                                  f"settings (saved vs now): {diff}")
            start = int(meta["step"])
            kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start]
            sync("open_run:read")
            if is_primary():
                write_lines_atomic(metrics_path, kept)
                print(f"resumed from {ckpt.step_dir(step0)} at step {start}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    return Run(args, run_dir, config, ckpt, tr, opt_state, start)


@dataclasses.dataclass
class LoopResult:
    tr: Any
    opt_state: Any
    times: list  # seconds of each step after the first of this process (which includes compilation)
    wall: float
    checkpoint_bytes: int | None
    records: list  # every line of metrics.jsonl
    final: dict  # the last evaluation (at the final step; evaluated now if the log has none)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records if "loss" in r]

    def common_summary(self) -> dict:
        """Loss and timing figures every trainer reports."""
        import jax

        from train.checkpoint import tree_checksum
        from train.parallel import to_host

        losses = self.losses
        tail = max(1, len(losses) // 10)
        return {
            "train_loss_last10pct": float(np.mean(losses[-tail:])) if losses else None,
            "final_loss": losses[-1] if losses else None,
            "sec_per_step": float(np.median(self.times)) if self.times else None,
            "wall_s": self.wall,
            "checkpoint_bytes": self.checkpoint_bytes,
            "params_sha256": tree_checksum([to_host(x) for x in jax.tree_util.tree_leaves(self.tr)])[0],
        }


def train_loop(run: Run, *, train_step, frozen, schedule, order: BatchOrder, get_batch: Callable,
               evaluate: Callable[[Any], dict], bar_metric: str, model_bytes: int, desc: str,
               view: Callable[[Any], Any] = lambda t: t) -> LoopResult:
    """Steps ``run.start .. args.steps``: batch ``get_batch(order.indices(step))``, one
    ``train_step(tr, opt_state, frozen, batch, key_step)``; a metrics line per step
    (``step, loss, lr, sec_per_step``) plus ``evaluate(tr)``'s dict every ``--eval-every`` steps and
    at the end; a checkpoint every ``--ckpt-every`` steps and at the end. A non-finite loss raises
    `FloatingPointError`.

    `view` maps the step's own form of ``(tr, opt_state)`` to the one checkpoints, `evaluate` and the
    result hold (pmap's per-device copies → one copy: `train.parallel.Parallel.unreplicated`). With
    several processes every process runs this loop in step (the same jitted calls in the same
    order); only process 0 writes metrics and shows the bar."""
    import jax
    from tqdm import tqdm

    args, ckpt = run.args, run.ckpt
    tr, opt_state, start = run.tr, run.opt_state, run.start
    step_base = jax.random.fold_in(jax.random.key(args.seed), 2)
    ckpt_bytes = None
    times = []
    primary = is_primary()
    bar = tqdm(total=args.steps, initial=start, disable=args.quiet or not primary, dynamic_ncols=True, desc=desc,
               file=sys.stderr)
    t_run = time.perf_counter()
    final = None
    with open(run.metrics_path if primary else os.devnull, "a") as mf:
        for step in range(start, args.steps):
            batch = get_batch(order.indices(step))
            t0 = time.perf_counter()
            tr, opt_state, loss = train_step(tr, opt_state, frozen, batch, jax.random.fold_in(step_base, step))
            loss = float(loss)
            dt = time.perf_counter() - t0
            if step > start:  # the first step of a process includes compilation
                times.append(dt)
            done = step + 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {done}; lower --lr")
            rec = {"step": done, "loss": loss, "lr": float(schedule(step)), "sec_per_step": dt}
            if done % args.eval_every == 0 or done == args.steps:
                rec.update(evaluate(view(tr)))
                final = rec
                bar.set_postfix(loss=f"{loss:.3f}", **{bar_metric: f"{rec[bar_metric]:.3f}"})
            elif done % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            epoch, pos = order.position(done)
            meta = {"config": run.config,
                    "data_state": {"epoch": epoch, "batch_in_epoch": pos, "seed": args.seed},
                    "rng_state": {"dropout": f"fold_in(fold_in(key({args.seed}), 2), step)"}}
            if ckpt.save(done, view((tr, opt_state)), meta, force=done == args.steps):
                if ckpt_bytes is None:
                    ckpt_bytes = ckpt.size_bytes(done)
                    if primary:
                        bar.write(f"checkpoint {ckpt.step_dir(done)}: {ckpt_bytes / 1e6:.2f} MB "
                                  f"(trainable half + optimizer state); full model parameters: "
                                  f"{model_bytes / 1e6:.2f} MB")
            bar.update(1)
    bar.close()
    wall = time.perf_counter() - t_run
    last = ckpt.latest_step()
    if last is not None:
        ckpt_bytes = ckpt.size_bytes(last)
    ckpt.close()

    sync("train_loop:end")  # process 0 has written its last metrics line
    tr, opt_state = view((tr, opt_state))
    recs = read_metrics(run.metrics_path)
    if final is None:  # resumed at the final step: evaluate now (in every process alike)
        final = {"step": args.steps, **evaluate(tr)}
    return LoopResult(tr, opt_state, times, wall, ckpt_bytes, recs, final)
