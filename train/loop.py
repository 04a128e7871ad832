"""The run: batch order, run directory, checkpoints and resume, and the training loop.

* deterministic batches: `BatchOrder` — batch k is rows ``perm_e[j·B:(j+1)·B]`` with
  ``e, j = divmod(k, N // B)`` and ``perm_e`` a permutation drawn from ``(seed, e)``; the step key
  of step k is ``fold_in(fold_in(key(seed), 2), k)``. So a run resumed at step k replays the
  uninterrupted run bit for bit;
* the run directory (`prepare_run_dir`: ``--resume`` / ``--overwrite``), orbax checkpoints of the
  trainable half and the optimizer state (`open_run` restores the latest and refuses one written with
  other trajectory settings), the progress bar and the loop itself (`train_loop`), which logs
  ``metrics.jsonl`` (`train.metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from .checkpoint import Checkpointer, tree_checksum
from .errors import ConfigError
from .hosts import is_primary, sync, to_host
# plot_runs is not used here: `train.loop.plot_runs` is where callers have it from
from .metrics import plot_runs, read_metrics, write_lines_atomic  # noqa: F401


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


def step_key(seed: int, step: int):
    """The dropout key of `step`: ``fold_in(fold_in(key(seed), 2), step)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)


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
    ckpt: Checkpointer
    tr: Any
    opt_state: Any
    start: int

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def tree_sha256(tree) -> str:
    """sha256 over every leaf of `tree` (dtype, shape and bytes, gathered to the host)."""
    return tree_checksum([to_host(x) for x in jax.tree.leaves(tree)])[0]


def open_run(args, run_dir: Path, config: dict, trajectory, tr, opt_state, legacy: dict | None = None) -> Run:
    """Open the run's checkpoints; with ``--resume`` restore the latest finalized one (refusing one
    written with other values of the `trajectory` keys of `config`; a key its config lacks counts
    as its `legacy` value, for settings added after it was written) and drop the metrics logged
    after it. Writes ``config.json``."""
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
            saved = {**(legacy or {}), **meta["config"]}
            diff = {k: (saved.get(k), config[k]) for k in trajectory if saved.get(k) != config[k]}
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
        losses = self.losses
        tail = max(1, len(losses) // 10)
        return {
            "train_loss_last10pct": float(np.mean(losses[-tail:])) if losses else None,
            "final_loss": losses[-1] if losses else None,
            "sec_per_step": float(np.median(self.times)) if self.times else None,
            "wall_s": self.wall,
            "checkpoint_bytes": self.checkpoint_bytes,
            "params_sha256": tree_sha256(self.tr),
        }


def _checkpoint_meta(run: Run, done: int, order: BatchOrder) -> dict:
    epoch, pos = order.position(done)
    seed = run.args.seed
    return {"config": run.config, "data_state": {"epoch": epoch, "batch_in_epoch": pos, "seed": seed},
            "rng_state": {"dropout": f"fold_in(fold_in(key({seed}), 2), step)"}}


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
    def step(tr, opt_state, step):
        tr, opt_state, loss = train_step(tr, opt_state, frozen, get_batch(order.indices(step)),
                                         step_key(run.args.seed, step))
        return tr, opt_state, [loss]

    return train_loop_many([run], step=step, state=(run.tr, run.opt_state), schedules=[schedule],
                           orders=[order], evaluates=[evaluate], bar_metric=bar_metric,
                           model_bytes=model_bytes, desc=desc, views=lambda state: [view(state)])[0]


def train_loop_many(runs: list[Run], *, step: Callable, state, schedules, orders, evaluates, bar_metric: str,
                    model_bytes: int, desc: str, views: Callable[[Any], list]) -> list[LoopResult]:
    """`train_loop` for K runs trained together (several adapters in one step, `train.task`):
    ``step(tr, opt_state, step) -> (tr, opt_state, [loss of each run])`` advances all of them,
    ``views((tr, opt_state))`` gives each run's own ``(tr, opt_state)`` for its checkpoints,
    evaluation and result. Each run logs its own metrics and checkpoints as if trained alone."""
    args = runs[0].args
    starts = {r.start for r in runs}
    if len(starts) > 1:
        raise ConfigError(f"the runs trained together are at different steps {sorted(starts)} (one was "
                          "cut off between two checkpoints of another): resume them one by one")
    start = starts.pop()
    tr, opt_state = state
    ckpt_bytes, times, finals = [None] * len(runs), [], [None] * len(runs)
    primary = is_primary()
    bar = tqdm(total=args.steps, initial=start, disable=args.quiet or not primary, dynamic_ncols=True, desc=desc,
               file=sys.stderr)
    t_run = time.perf_counter()
    files = [open(r.metrics_path if primary else os.devnull, "a") for r in runs]
    try:
        for k in range(start, args.steps):
            t0 = time.perf_counter()
            tr, opt_state, losses = step(tr, opt_state, k)
            losses = [float(v) for v in losses]
            dt = time.perf_counter() - t0
            if k > start:  # the first step of a process includes compilation
                times.append(dt)
            done = k + 1
            for run, loss in zip(runs, losses):
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{run.run_dir.name}: loss is {loss} at step {done}; lower --lr")
            evaluating = done % args.eval_every == 0 or done == args.steps
            own = views((tr, opt_state)) if evaluating or done % runs[0].ckpt.every == 0 or done == args.steps else None
            for i, (run, loss, mf) in enumerate(zip(runs, losses, files)):
                rec = {"step": done, "loss": loss, "lr": float(schedules[i](k)), "sec_per_step": dt}
                if evaluating:
                    rec.update(evaluates[i](own[i][0]))
                    finals[i] = rec
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                # called every step (a no-op between checkpoints, where `own` is not formed)
                if run.ckpt.save(done, None if own is None else own[i], _checkpoint_meta(run, done, orders[i]),
                                 force=done == args.steps) and ckpt_bytes[i] is None:
                    ckpt_bytes[i] = run.ckpt.size_bytes(done)
                    if primary:
                        bar.write(f"checkpoint {run.ckpt.step_dir(done)}: {ckpt_bytes[i] / 1e6:.2f} MB "
                                  f"(trainable half + optimizer state); full model parameters: "
                                  f"{model_bytes / 1e6:.2f} MB")
            if evaluating:
                bar.set_postfix(loss=f"{losses[0]:.3f}", **{bar_metric: f"{finals[0][bar_metric]:.3f}"})
            elif done % 10 == 0:
                bar.set_postfix(loss=f"{losses[0]:.3f}")
            bar.update(1)
    finally:
        for mf in files:
            mf.close()
    bar.close()
    wall = time.perf_counter() - t_run
    results = []
    own = views((tr, opt_state))
    for i, run in enumerate(runs):
        last = run.ckpt.latest_step()
        if last is not None:
            ckpt_bytes[i] = run.ckpt.size_bytes(last)
        run.ckpt.close()
    sync("train_loop:end")  # process 0 has written its last metrics line
    for i, run in enumerate(runs):
        run_tr, run_opt = own[i]
        final = finals[i]
        if final is None:  # resumed at the final step: evaluate now (in every process alike)
            final = {"step": args.steps, **evaluates[i](run_tr)}
        results.append(LoopResult(run_tr, run_opt, times, wall, ckpt_bytes[i], read_metrics(run.metrics_path), final))
    return results
