"""The command-line flags every trainer has, and their checks before anything loads."""

from __future__ import annotations

import argparse
import math

from .errors import ConfigError
from .hosts import COMPILE_CACHE_ENV

# methods that train plain LoRA adapters (exportable as PEFT LoRA); "dora" adds a magnitude
LORA_METHODS = ("lora", "lora-pro", "lora-pro-adamw", "lora-plus", "riemannian")
# --init values: `lora_jax.apply`'s inits, and LoRA-GA (`lora_jax.lora_ga_init`, from gradients)
INITS = ("lora", "gaussian", "pissa", "olora", "lora-ga")
# trajectory flags added after runs were first written: a run directory written before them
# resumes as if it had been given these values (which are what it ran with)
TRAJECTORY_DEFAULTS = {"init": "lora", "ga_batches": 8, "rslora": False, "loraplus_ratio": 16.0}


def add_common_args(p: argparse.ArgumentParser, *, methods, default_lr: dict, targets_help: str,
                    steps: int = 300, batch_size: int = 32, eval_every: int = 100, out: str = "runs/run") -> None:
    """The flags every trainer has (method, LoRA shape, schedule, seeds, limits, checkpoints, output)."""
    p.add_argument("--method", default="lora", choices=methods)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=None, help=targets_help)
    p.add_argument("--init", default="lora", choices=INITS,
                   help="adapter init (LoRA methods): lora (Kaiming a, zero b: PEFT's default), gaussian, pissa "
                        "(top singular directions of each kernel), olora (QR), lora-ga (the top singular "
                        "directions of the full gradient averaged over --ga-batches training batches; "
                        "lora_jax.lora_ga_init, PEFT's formulas). pissa/olora/lora-ga offset the frozen "
                        "kernel so that training starts at the base model")
    p.add_argument("--ga-batches", type=int, default=TRAJECTORY_DEFAULTS["ga_batches"],
                   help="--init lora-ga: training batches (the first ones of the run's order) whose mean "
                        "full gradient the init is computed from")
    p.add_argument("--rslora", action="store_true", help="rsLoRA scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--loraplus-ratio", type=float, default=TRAJECTORY_DEFAULTS["loraplus_ratio"],
                   help="--method lora-plus: b's learning rate over a's (LoRA+'s lambda; PEFT's default 16)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per method: {default_lr})")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0,
                   help="clip the gradient to this global norm before the method's optimizer (for LoRA-Pro: "
                        "the raw LoRA gradients, before the adjustment; as the reference and HF Trainer's "
                        "max_grad_norm); 0: no clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="train one adapter per learning rate (times --seeds) in one stacked run: one process, "
                        "one compiled step vmapped over the adapters on the shared frozen base; each adapter "
                        "gets its own run directory <name>-lr<lr>-s<seed> (metrics, checkpoints, summary), "
                        "as if trained alone")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="the seeds of a stacked run (see --lrs): each its own adapter init, batch order and "
                        "dropout keys")
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
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help=f"JAX's persistent compilation cache, so a later run loads the compiled steps "
                        f"instead of compiling them again; 'off' for none (default: ${COMPILE_CACHE_ENV}, "
                        f"else <lora_jax cache>/jax_compilation)")


# (flag, test, what it must be): every numeric flag is checked before anything loads; a trainer
# without one of these flags skips its rule
NUMERIC_RULES = [
    *((name, lambda v: v >= 1, ">= 1") for name in (
        "steps", "batch_size", "eval_every", "max_len", "eval_batch_size", "rank", "keep",
        "train_limit", "eval_limit", "train_size", "max_new_tokens", "ga_batches")),
    ("lr", lambda v: v > 0, "> 0"),
    ("alpha", lambda v: v > 0, "> 0"),
    ("loraplus_ratio", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("clip_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ckpt_every", lambda v: v >= 0, ">= 0"),
    ("train_eval_limit", lambda v: v >= 0, ">= 0"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("data_seed", lambda v: v >= 0, ">= 0"),
]


def check_stacked(args: argparse.Namespace) -> None:
    """Refusals of a stacked run (``--lrs``/``--seeds``): what its adapters cannot share."""
    if not (args.lrs or args.seeds):
        return
    if args.method in ("full", "probe"):
        raise ConfigError(f"--lrs/--seeds train adapters on one shared frozen base; --method {args.method} "
                          "has no frozen base: run its settings one by one")
    if args.init == "lora-ga":
        raise ConfigError("--init lora-ga with --lrs/--seeds: its init offsets the frozen kernels by each run's "
                          "gradient estimate, so the adapters would not share a base; run them one by one")
    exports = [f"--{n.replace('_', '-')}" for n in ("export_peft", "export_merged", "export_gguf")
               if getattr(args, n, None) is not None]
    if exports:
        raise ConfigError(f"{' and '.join(exports)} with --lrs/--seeds: export each adapter from its run directory")
    for name in ("lrs", "seeds"):
        values = getattr(args, name) or []
        if len(set(values)) != len(values):
            raise ConfigError(f"--{name} repeats a value: {values}")
    if any(v <= 0 for v in args.lrs or []):
        raise ConfigError(f"--lrs must all be > 0, got {args.lrs}")
    if any(v < 0 for v in args.seeds or []):
        raise ConfigError(f"--seeds must all be >= 0, got {args.seeds}")


def check_export_peft(args: argparse.Namespace) -> None:
    """Refusals of ``--export-peft``: what a PEFT LoRA adapter on the original model cannot hold."""
    if getattr(args, "export_peft", None) is None:
        return
    if args.method not in (*LORA_METHODS, "dora"):
        raise ConfigError(f"--export-peft writes LoRA adapters; --method {args.method} trains none "
                          f"(use one of {', '.join(LORA_METHODS)}, dora)")
    if args.method == "dora" and getattr(args, "lora_dropout", 0.0):
        raise ConfigError("--export-peft --method dora: PEFT applies LoRA dropout to DoRA's scaled part "
                          "differently (lora_jax.apply's dora), so train with --lora-dropout 0 to export")
    if args.init in ("pissa", "olora", "lora-ga"):
        raise ConfigError(f"--export-peft: --init {args.init} trains against an offset base kernel "
                          f"(w − s·a₀b₀), so its adapters are not a LoRA of the original model; "
                          f"export from a run with --init lora or gaussian"
                          + (", or export the merged model" if hasattr(args, "export_merged") else ""))


def check_methods(args: argparse.Namespace) -> None:
    """Raise `ConfigError` for flags that the chosen method cannot use (not silently ignored)."""
    adapts = args.method in LORA_METHODS or args.method == "dora"
    if not adapts:
        used = [f for f, on in (("--init", args.init != "lora"), ("--rslora", args.rslora)) if on]
        if used:
            raise ConfigError(f"{' and '.join(used)}: --method {args.method} trains no adapters")


def check_numeric(args: argparse.Namespace, rules=NUMERIC_RULES) -> None:
    """Raise `ConfigError` naming the first numeric flag outside its range (NaN included)."""
    for name, ok, rule in rules:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
