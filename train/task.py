"""One trainer framework: a `Task` supplies what is its own (model, data, loss, evaluation, summary
fields); the command line, its checks, the run directory, resume, the loop, ``summary.json``, the
plot and the error handling are written here once, for every task (`train.classify`, `train.lm`).

A task subclasses `Task`, sets its class attributes (program name, models, methods, default
learning rates, the trajectory flags a resumed run must agree on, ...) and fills in the hooks:

* ``add_args(p)`` / ``check_args(args)``: its own flags and their checks (after `flags.check_numeric`);
* ``check_layout(args, par)``: refusals of a device layout (before any model is read);
* ``resolve_model(name)``: the local path of a model name (fetching a known one);
* ``build(args, path, par=None)``: the model and its halves, a `Setup` (`build_setup` does the common
  part: ``full``/``probe``/LoRA halves, FSDP placement, optimizer and sizes);
* ``load_data(job)``: the task's data, an object whose ``train`` dict holds the training arrays
  (rows selected by `train.loop.BatchOrder`, columns `batch_keys`);
* ``loss(forward, params, batch, key)``: the mean training loss of a batch; ``eval_step(setup)``:
  the jitted function its evaluation calls;
* ``evaluate(job, tr)``: the metrics logged every ``--eval-every`` steps (``eval_acc``, ``eval_loss``, ...);
* ``before_training(job)`` / ``after_training(job, result)``: summary fields of their own (a base
  model's score, a PEFT export, samples ...); ``score_text(summary)``: its part of the summary line.

`Task.run` is then the same for every task: resolve and build, load the data, open (or resume) the
run, train with `train.loop.train_loop`, write ``summary.json`` and the loss plot of ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import lora_jax
from . import flags, loop, parallel
from .errors import USER_ERRORS, ConfigError
from .hosts import compile_cache_dir, init_distributed, is_primary, use_compile_cache
from .loop import tree_sha256
from .metrics import count, nbytes, plot_runs
from .optim import make_optimizer, make_schedule

COMMON_SUMMARY = ("train_loss_last10pct", "final_loss", "sec_per_step", "wall_s", "checkpoint_bytes")


@dataclasses.dataclass
class Setup:
    """A built model: its trainable and frozen halves, optimizer, schedule and sizes."""

    model: Any
    base: Any  # the loaded parameters, placed for the layout, before any adapter (the model before training)
    trainable: Any
    frozen: Any  # None for full fine-tuning
    optimizer: Any
    schedule: Any
    num_params: int  # a quantized weight counts its logical shape
    num_trainable: int
    model_bytes: int  # bytes of the full model's parameters (quantized weights: their stored blocks)
    # ``--init lora-ga``: trainable/frozen/num_trainable are None until `Task.run` calls
    # ``pending(mean full gradient)`` -> (trainable, frozen); see `Task.lora_ga_gradient`
    pending: Callable | None = dataclasses.field(default=None, kw_only=True)
    # the optimizer with its schedule peaking at `lr` (a traced scalar in a stacked run's step)
    optimizer_at: Callable | None = dataclasses.field(default=None, kw_only=True)


@dataclasses.dataclass
class Job:
    """One run in progress, as a task's hooks see it."""

    args: argparse.Namespace
    par: parallel.Parallel
    path: Path  # the resolved model
    run_dir: Path
    setup: Any
    data: Any = None  # the task's `load_data`
    eval_step: Callable | None = None


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` as a command: bad input (`train.errors`: `ConfigError`, `AssetError`,
    `CheckpointError`) becomes one line on stderr and exit status 2, not a traceback."""
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def combined(tr, fr):
    """The whole parameter tree of a (trainable, frozen) pair (frozen is None for full fine-tuning)."""
    return tr if fr is None else lora_jax.combine(tr, fr)


def _halves(args, par: parallel.Parallel, params, *, forward, example, default_targets, head, **apply_kw):
    """(placed params, trainable, frozen, pending) of `params` for ``--method`` and ``--init``.
    For ``--init lora-ga`` trainable and frozen are None and `pending` maps the mean full gradient
    of the placed params to them (`Task.run` estimates it once the data are loaded)."""
    if args.method in ("full", "probe"):
        params = par.place_params(params)
        return (params, params, None, None) if args.method == "full" else (params, *lora_jax.split(params, head), None)
    targets = args.targets or default_targets
    # axis roles read from how the model uses each kernel (a shape alone cannot say)
    layout = lora_jax.layout_of(forward, params, example)
    params = par.place_params(params, layout)  # FSDP: adapters are then created split like their kernels
    kw = dict(alpha=args.alpha, targets=targets, layout=layout, rslora=args.rslora, dora=args.method == "dora",
              key=jax.random.fold_in(jax.random.key(args.seed), 1), **apply_kw)

    def adapted(make):
        try:
            return lora_jax.split(make(), head)
        except ValueError as e:
            raise ConfigError(f"--targets {targets!r} --init {args.init}: {e}") from e

    if args.init == "lora-ga":
        return params, None, None, lambda grads: adapted(lambda: lora_jax.lora_ga_init(params, grads, args.rank, **kw))
    return (params, *adapted(lambda: lora_jax.apply(params, args.rank, init=args.init, **kw)), None)


def build_setup(args, par: parallel.Parallel | None, model, params, *, forward, example, default_targets,
                head=None, compute_dtype=None, cls=Setup, extra: dict | None = None, **apply_kw) -> Setup:
    """The `Setup` (or `cls`, a subclass, with the `extra` fields) of `model` with `params`:
    everything trains (``full``), only the `head` selector (``probe``), or LoRA adapters on
    ``--targets`` (default `default_targets`) plus `head`, with axis roles read from
    ``forward(params, example)``; ``lora_jax.apply`` also gets `apply_kw`. Placed for `par`
    (default one device); the optimizer is ``--method``'s (`train.optim`)."""
    par = par or parallel.Parallel("single")
    model_bytes = nbytes(params)
    num_params = count(params)
    base, trainable, frozen, pending = _halves(args, par, params, forward=forward, example=example,
                                               default_targets=default_targets, head=head, **apply_kw)
    schedule = make_schedule(args)
    optimizer = make_optimizer(args.method, schedule, args.weight_decay, compute_dtype=compute_dtype,
                               clip_norm=args.clip_norm, loraplus_ratio=args.loraplus_ratio)
    def optimizer_at(lr):
        return make_optimizer(args.method, make_schedule(args, lr), args.weight_decay, compute_dtype=compute_dtype,
                              clip_norm=args.clip_norm, loraplus_ratio=args.loraplus_ratio)

    return cls(model, base, trainable, frozen, optimizer, schedule, num_params,
               None if trainable is None else count(trainable), model_bytes, **(extra or {}), pending=pending,
               optimizer_at=optimizer_at)


def compile_ahead(step, example: tuple) -> tuple[Callable, dict | None]:
    """`step` compiled for the shapes of `example`, and its ``memory_analysis()`` in bytes
    (argument, output, temp, generated code; None where the backend gives none)."""
    compiled = step.lower(*example).compile()
    mem = compiled.memory_analysis()
    return compiled, None if mem is None else {
        k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code")}


class Task:
    """A kind of training (see the module docstring); subclasses set these and the hooks."""

    models: dict[str, str]  # known model names → where they come from (the first is --model's default)
    checkpoint_help: str  # what else --model may name (a local checkpoint)
    methods: tuple[str, ...]
    default_lr: dict[str, float]
    trajectory: tuple[str, ...]  # flags a resumed run must agree on
    model_key: str  # config.json's key for the resolved model path
    batch_keys: tuple[str, ...]  # columns of `load_data(...).train` a training batch holds
    common_defaults: dict = {}  # `flags.add_common_args` keywords (out, steps, batch size, ...)
    parser_defaults: dict = {}  # defaults of common flags changed afterwards
    reports_step_memory = False  # compile the step ahead and report its memory analysis

    # ------------------------------------------------------------------ hooks

    def add_args(self, p: argparse.ArgumentParser) -> None:
        pass

    def check_args(self, args: argparse.Namespace) -> None:
        pass

    def check_layout(self, args, par: parallel.Parallel) -> None:
        par.check_batch(args.batch_size)

    def resolve_model(self, name: str) -> Path:
        raise NotImplementedError

    def build(self, args, path: Path, par: parallel.Parallel | None = None) -> Setup:
        raise NotImplementedError

    def load_data(self, job: Job) -> Any:
        raise NotImplementedError

    def loss(self, forward, params, batch, key):
        raise NotImplementedError

    def eval_step(self, setup) -> Callable:
        raise NotImplementedError

    def evaluate(self, job: Job, tr) -> dict:
        raise NotImplementedError

    def before_training(self, job: Job) -> dict:
        return {}

    def after_training(self, job: Job, result: loop.LoopResult) -> dict:
        return {}

    def score_text(self, summary: dict) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ the command line

    def build_parser(self) -> argparse.ArgumentParser:
        """The task's flags: ``--model``, the common ones (`train.flags`), its own, the devices'.
        Program name and description come from the task's module (its docstring's first paragraph)."""
        module = sys.modules[type(self).__module__]
        p = argparse.ArgumentParser(prog=f"python -m {module.__spec__.name}",
                                    description=module.__doc__.split("\n\n")[0],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--model", default=next(iter(self.models)),
                       help=f"one of {sorted(self.models)} or {self.checkpoint_help}")
        flags.add_common_args(p, methods=self.methods, default_lr=self.default_lr, **self.common_defaults)
        p.set_defaults(**self.parser_defaults)
        self.add_args(p)
        parallel.add_args(p)
        return p

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        """The flags of `argv`, checked (`ConfigError`) before anything loads."""
        args = self.build_parser().parse_args(argv)
        if args.lr is None:
            args.lr = self.default_lr[args.method]
        flags.check_numeric(args)
        flags.check_methods(args)
        flags.check_stacked(args)
        self.check_args(args)
        return args

    def unknown_model(self, name: str, what: str) -> ConfigError:
        """The error for a model name that is neither known nor `what` (a local checkpoint)."""
        known = ", ".join(sorted(self.models))
        return ConfigError(f"unknown model {name!r}: choose one of {known} "
                           f"({'; '.join(f'{k}: {v}' for k, v in self.models.items())}), or give {what}")

    # ------------------------------------------------------------------ the run

    def make_steps(self, setup, method: str, par: parallel.Parallel | None = None):
        """(train_step, eval_step), compiled for the layout `par` (default one device). LoRA methods
        run the forward through `lora_jax.wrap` (factored products, no full-weight gradients)."""
        par = par or parallel.Parallel("single")
        forward = setup.model.apply if method == "full" else lora_jax.wrap(setup.model.apply)

        def loss_fn(tr, fr, batch, key):
            return self.loss(forward, combined(tr, fr), batch, key)

        return par.train_step(loss_fn, setup.optimizer), self.eval_step(setup)

    def run(self, args: argparse.Namespace) -> dict | list[dict]:
        """Train as `args` say; returns the summary (also written to ``summary.json``), or with
        ``--lrs``/``--seeds`` the summaries of the stacked run's adapters (`run_stacked`)."""
        if args.lrs or args.seeds:
            return self.run_stacked(args)
        par = parallel.from_args(args)
        self.check_layout(args, par)
        path = self.resolve_model(args.model)
        run_dir = loop.prepare_run_dir(args)
        # everything that can be refused is checked before any step: --targets matching nothing
        # fails in `build`, before any data are loaded
        job = Job(args, par, path, run_dir, self.build(args, path, par=par))
        job.data = self.load_data(job)
        setup, train = job.setup, job.data.train
        order = loop.BatchOrder(args.seed, len(train[self.batch_keys[0]]), args.batch_size)
        config = {**{k: getattr(args, k) for k in self.trajectory}, self.model_key: str(path)}
        trajectory = self.trajectory
        if setup.pending is not None:
            self.finish_lora_ga(job, order)
            # a resumed run recomputes the init (and the frozen offset) from the same batches: the
            # fingerprint makes sure it got the same one, not silently another model
            config["lora_ga_init_sha256"] = tree_sha256(setup.trainable)
            trajectory = (*trajectory, "lora_ga_init_sha256")
        # the optimizer state is created where the trainable half lives (moments split like their weights)
        opened = loop.open_run(args, run_dir, config, trajectory, setup.trainable,
                               par.on_devices(setup.optimizer.init(setup.trainable)),
                               legacy=flags.TRAJECTORY_DEFAULTS)
        train_step, job.eval_step = self.make_steps(setup, args.method, par)
        opened.tr, opened.opt_state = par.for_step((opened.tr, opened.opt_state))  # pmap: a copy per device
        frozen = par.for_step(setup.frozen)

        def get_batch(idx):
            return par.batch({k: train[k][idx] for k in self.batch_keys})

        fields = {}
        if self.reports_step_memory:  # compiled once, for its memory analysis, then used for the steps
            example = (opened.tr, opened.opt_state, frozen, get_batch(order.indices(0)), loop.step_key(args.seed, 0))
            train_step, fields["step_memory_bytes"] = compile_ahead(train_step, example)
        fields.update(self.before_training(job))
        res = loop.train_loop(opened, train_step=train_step, frozen=frozen, schedule=setup.schedule, order=order,
                              get_batch=get_batch, evaluate=lambda tr: self.evaluate(job, tr), bar_metric="eval_acc",
                              model_bytes=setup.model_bytes, desc=f"{args.method} s{args.seed}",
                              view=par.unreplicated)
        summary = self.summarize(job, res, {**fields, **self.after_training(job, res)})
        if is_primary():
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            if not args.no_plot:
                plot_runs(args.out)
        return summary

    def run_stacked(self, args: argparse.Namespace) -> list[dict]:
        """``--lrs``/``--seeds``: one adapter per (lr, seed), trained together by one jitted step
        vmapped over the adapters (each its own init, batch order, dropout keys, lr schedule and
        optimizer state; the frozen base shared), each with the run directory, metrics, checkpoints
        and summary its own run would have (``<name>-lr<lr>-s<seed>``)."""
        par = parallel.from_args(args)
        if par.kind != "single":
            raise ConfigError("--lrs/--seeds run on one device (the adapters are vmapped there); "
                              f"this layout is {par.describe()}")
        self.check_layout(args, par)
        path = self.resolve_model(args.model)
        base = args.name or args.method
        each = [argparse.Namespace(**{**vars(args), "lr": lr, "seed": seed, "lrs": None, "seeds": None,
                                      "name": f"{base}-lr{lr:g}-s{seed}"})
                for lr in (args.lrs or [args.lr]) for seed in (args.seeds or [args.seed])]
        jobs = [Job(a, par, path, loop.prepare_run_dir(a), self.build(a, path, par=par)) for a in each]
        frozen = jobs[0].setup.frozen
        if args.init != "lora":  # an offset init (pissa, olora): every adapter's base must be the same
            for job in jobs[1:]:
                if tree_sha256(job.setup.frozen) != tree_sha256(frozen):
                    raise ConfigError(f"--init {args.init}: the runs' frozen bases differ; run them one by one")
        data = self.load_data(jobs[0])
        eval_step = self.eval_step(jobs[0].setup)
        opened, orders = [], []
        for job in jobs:
            job.data, job.eval_step, job.setup.frozen = data, eval_step, frozen
            order = loop.BatchOrder(job.args.seed, len(data.train[self.batch_keys[0]]), args.batch_size)
            config = {**{k: getattr(job.args, k) for k in self.trajectory}, self.model_key: str(path)}
            opened.append(loop.open_run(job.args, job.run_dir, config, self.trajectory, job.setup.trainable,
                                        job.setup.optimizer.init(job.setup.trainable),
                                        legacy=flags.TRAJECTORY_DEFAULTS))
            orders.append(order)
        stacked = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
        state = (stacked([o.tr for o in opened]), stacked([o.opt_state for o in opened]))
        lrs = jnp.asarray([job.args.lr for job in jobs], jnp.float32)
        setup = jobs[0].setup
        forward = lora_jax.wrap(setup.model.apply)

        def one(tr, opt_state, fr, batch, key, lr):
            loss, grads = jax.value_and_grad(lambda t: self.loss(forward, combined(t, fr), batch, key))(tr)
            updates, opt_state = setup.optimizer_at(lr).update(grads, opt_state, tr)
            return optax.apply_updates(tr, updates), opt_state, loss

        many = jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0, 0, 0)), donate_argnums=(0, 1))
        train = data.train

        def step(tr, opt_state, k):
            batch = {name: jnp.stack([train[name][o.indices(k)] for o in orders]) for name in self.batch_keys}
            keys = jnp.stack([loop.step_key(job.args.seed, k) for job in jobs])
            tr, opt_state, losses = many(tr, opt_state, frozen, batch, keys, lrs)
            return tr, opt_state, list(losses)

        n = len(jobs)
        fields = [self.before_training(job) for job in jobs]
        results = loop.train_loop_many(
            opened, step=step, state=state, schedules=[job.setup.schedule for job in jobs], orders=orders,
            evaluates=[functools.partial(self.evaluate, job) for job in jobs], bar_metric="eval_acc",
            model_bytes=setup.model_bytes, desc=f"{args.method} ×{n}",
            views=lambda st: [jax.tree.map(lambda x: x[i], st) for i in range(n)])
        summaries = []
        for job, res, own in zip(jobs, results, fields):
            summary = self.summarize(job, res, {**own, **self.after_training(job, res), "stacked_with": n})
            if is_primary():
                (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            summaries.append(summary)
        if is_primary() and not args.no_plot:
            plot_runs(args.out)
        return summaries

    def finish_lora_ga(self, job: Job, order: loop.BatchOrder) -> None:
        """``--init lora-ga``: the mean full gradient of the base model's loss over the first
        ``--ga-batches`` batches of the run's order (the batches steps 0, 1, ... train on, as PEFT's
        and the authors' examples take them from the training loader; dropout keys of their own),
        then the adapters from it (`lora_jax.lora_ga_init`), filled into `job.setup`."""
        args, setup, par, train = job.args, job.setup, job.par, job.data.train

        @jax.jit
        def grad_sum(total, params, batch, key):
            g = jax.grad(lambda p: self.loss(setup.model.apply, p, batch, key))(params)
            return jax.tree.map(jnp.add, total, g)

        total = jax.tree.map(jnp.zeros_like, setup.base)
        for k in range(args.ga_batches):
            host = {name: train[name][order.indices(k)] for name in self.batch_keys}
            # the full model's step runs on one program over the mesh; pmap's layout splits rows
            # per device, which a plain jit does not take
            batch = par.batch(host) if par.kind == "mesh" else {n: jnp.asarray(v) for n, v in host.items()}
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(args.seed), 3), k)
            total = grad_sum(total, setup.base, batch, key)
        grads = jax.tree.map(lambda g: g / args.ga_batches, total)
        setup.trainable, setup.frozen = setup.pending(grads)
        setup.num_trainable, setup.pending = count(setup.trainable), None

    def summarize(self, job: Job, res: loop.LoopResult, fields: dict) -> dict:
        """The summary every task reports, then the task's own `fields`."""
        args, setup, common = job.args, job.setup, res.common_summary()
        return {"method": args.method, "seed": args.seed, "steps": args.steps, "lr": args.lr,
                "trainable_params": setup.num_trainable, "total_params": setup.num_params,
                "eval_acc": res.final.get("eval_acc"), "eval_loss": res.final.get("eval_loss"),
                **{k: common[k] for k in COMMON_SUMMARY}, "full_model_param_bytes": setup.model_bytes,
                "params_sha256": common["params_sha256"], "run_dir": str(job.run_dir), **fields}

    def format_summary(self, s: dict) -> str:
        """The summary's one line: method, seed, parameters, the task's score, loss, speed, checkpoint."""
        ck = s.get("checkpoint_bytes")
        ck_txt = (f", checkpoint {ck / 1e6:.2f} MB vs full model params {s['full_model_param_bytes'] / 1e6:.2f} MB"
                  if ck else "")
        sps = s.get("sec_per_step")
        lr = f" lr {s['lr']:g}" if s.get("stacked_with") else ""  # which of a stacked run's adapters
        return (f"{s['method']}{lr} seed {s['seed']}: {s['trainable_params']:,} trainable params, "
                f"{self.score_text(s)}, train loss (last 10%) {s['train_loss_last10pct']:.4f}, "
                f"{'n/a' if sps is None else f'{sps:.3f}'} s/step{ck_txt}")

    def main(self, argv: list[str] | None = None) -> dict:
        """Parse `argv`, train, print the summary line; returns the summary dict. Bad input raises
        (`train.errors`); the command line (`cli`) turns it into a message and exit status 2."""
        args = self.parse_args(argv)
        use_compile_cache(compile_cache_dir(args.compile_cache))
        init_distributed(args)  # before anything touches a device
        summary = self.run(args)
        if is_primary():
            for s in summary if isinstance(summary, list) else [summary]:
                print(self.format_summary(s))
        return summary

    def cli(self, argv: list[str] | None = None) -> int:
        return cli(self.main, argv)
