"""Step, gradient, optimizer and forward times of the `train/bert.py` classifier, on whatever
backend JAX has: the measurements behind ``python -m bench.accelerator`` (a thin CLI over `main`).

By default the shape is BERT-base with random weights (12 layers, hidden 768, FFN 3072, vocab
30522), bf16 compute with float32 params, batch 32 × 256 tokens (right-padded, lengths drawn in
[T/2, T]), LoRA rank 8, alpha 16 on q, k, v, attention-out, FFN-in and FFN-out (plus the fresh
head, trained fully), AdamW lr 1e-4, no dropout. Every measurement is one jitted function:

* ``step/*``: value_and_grad + optimizer update + apply_updates, state donated. ``full`` (AdamW
  on every parameter), ``lora`` (AdamW), ``lora_pro`` (``chain(lora_pro(), adamw)``, "efficient"),
  ``lora_pro_adamw`` (``lora_pro_adamw``), ``lora_flat`` / ``lora_pro_flat`` (the same with
  ``optax.flatten(adamw)``: one buffer for all leaves).
* ``grad/*``: ``jax.grad`` of the loss only: ``full`` (embeddings trainable),
  ``full_frozen_embeddings`` (embeddings held constant), ``lora`` (adapters + head).
* ``opt/*``: the optimizer update + apply_updates alone on the LoRA trainable tree, with fixed
  gradients, state donated: ``adamw``, ``adamw_flat``, ``lora_pro``, ``lora_pro_flat``,
  ``lora_pro_adamw``.
* ``forward/*``: logits only: ``base`` (the plain model), ``lora_unmerged`` (through
  `lora_jax.wrap`), ``lora_merged`` (the params of `lora_jax.merge`).
* ``attention/*``: forward + backward of one attention call at the model's shape: ``xla``; on
  GPU also ``cudnn`` (the padding mask as cuDNN's bias, what the model runs) and
  ``cudnn_kv_lengths`` (padding as key lengths, valid for right-padded batches only).
* ``embedding_grad/*``: gradient of the three embedding lookups: ``gather_then_cast`` (what
  `BertEmbeddings` does: the scatter-add accumulates in f32) against ``cast_then_gather``
  (Flax's ``nn.Embed(dtype=bf16)``: a bf16 scatter-add).

Timing: everything is compiled first (lowering and compile seconds and XLA's
``memory_analysis`` recorded per function), called ``--warmup`` times, then timed in interleaved
rounds (`support.timing`), one call of each per round, for ``--rounds`` rounds, each call ended by
``jax.block_until_ready``; medians are reported, and ratios are medians of per-round ratios
(the two calls were adjacent in time, so load on a noisy machine hits both). ``--budget-s``
bounds the whole run: functions not compiled by the budget less a timing reserve (30 s, or
10%) are skipped (reported as skipped), and rounds stop at the budget (at least 3). On GPU each
record also counts the cuDNN fused-attention calls in the compiled HLO (``cudnn_fmha_calls``),
to show which functions reached cuDNN's kernel.

Output: a table, then one JSON object per line (``env``, one per measurement, one per
``ratio``), also written to ``--json PATH``.

    python -m bench.accelerator                       # BERT-base shape (minutes on a GPU)
    python -m bench.accelerator --torch-full-ms 38.3 --json accel.jsonl
    python -m bench.accelerator --small               # tiny config, a CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from support.probes import memory_of
from support.timing import Timings, interleave
from train import bert

# ---------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    batch: int
    seq: int


SHAPES = {"base": Shape(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, batch=32, seq=256),
          "small": Shape(layers=2, hidden=64, heads=4, ffn=256, vocab=1000, batch=4, seq=32)}

# (ratio name, numerator, denominator, goal: the ratio must be at most this)
GOALS = [
    ("lora_pro/lora step", "step/lora_pro", "step/lora", 1.10),
    ("lora_pro_adamw/lora step", "step/lora_pro_adamw", "step/lora", 1.25),
    ("lora/full step", "step/lora", "step/full", 0.75),
    ("lora/full_frozen_embeddings grad", "grad/lora", "grad/full_frozen_embeddings", 0.80),
]
# Informational ratios (no goal): does the flattened update pay, what does attention cost.
INFO = [
    ("adamw_flat/adamw opt", "opt/adamw_flat", "opt/adamw"),
    ("lora_pro_flat/lora_pro opt", "opt/lora_pro_flat", "opt/lora_pro"),
    ("lora_flat/lora step", "step/lora_flat", "step/lora"),
    ("lora_pro_flat/lora_pro step", "step/lora_pro_flat", "step/lora_pro"),
    ("lora_pro_flat/lora step", "step/lora_pro_flat", "step/lora"),
    ("lora_unmerged/base forward", "forward/lora_unmerged", "forward/base"),
    ("lora_merged/base forward", "forward/lora_merged", "forward/base"),
    ("full/full_frozen_embeddings grad", "grad/full", "grad/full_frozen_embeddings"),
    ("cudnn/xla attention", "attention/cudnn", "attention/xla"),
    ("cudnn_kv_lengths/cudnn attention", "attention/cudnn_kv_lengths", "attention/cudnn"),
    ("gather_then_cast/cast_then_gather embedding_grad", "embedding_grad/gather_then_cast",
     "embedding_grad/cast_then_gather"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny config for a CPU smoke run")
    for f in dataclasses.fields(Shape):
        p.add_argument(f"--{f.name}", type=int, default=None, help=f"override the shape's {f.name}")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay float32)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                   help="the model's attention kernel (auto: cuDNN on GPU where it applies)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="hidden dropout in the training steps (attention dropout stays 0: it "
                        "would take the materialised attention path)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="wall-clock bound for the whole run (see the module docstring)")
    p.add_argument("--compile-threads", type=int, default=1,
                   help="compile this many functions at once (compile_s then includes waiting)")
    p.add_argument("--torch-full-ms", type=float, default=None,
                   help="a PyTorch full fine-tuning step (ms) to compare step/full against")
    p.add_argument("--json", default=None, help="also write the JSON lines to this path")
    return p.parse_args(argv)


def shape_from(args) -> Shape:
    base = SHAPES["small" if args.small else "base"]
    return dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)
                                        if getattr(args, f.name) is not None})


# ---------------------------------------------------------------------------------------------
# the model, its halves and its losses


@dataclasses.dataclass
class Setup:
    model: Any
    params: Any        # {"params": ...}, float32
    trainable: Any     # LoRA adapters + head
    frozen: Any
    batch: tuple       # (input_ids, attention_mask, labels)
    config: bert.BertConfig
    dtype: Any


def build(shape: Shape, args) -> Setup:
    """Random BERT classifier, its LoRA halves (`apply` on `LORA_TARGETS`, head trainable) and a
    right-padded random batch."""
    config = bert.BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                             num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                             intermediate_size=shape.ffn, max_position_embeddings=max(512, shape.seq),
                             hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=0.0)
    dtype = jnp.dtype(args.dtype)
    attention = None if args.attention == "auto" else args.attention
    model, params = bert.init_classifier(config, 2, jax.random.key(0), dtype=dtype,
                                         param_dtype=jnp.float32, attention=attention)
    adapted = lora_jax.apply(params, rank=args.rank, alpha=args.alpha, targets=bert.LORA_TARGETS,
                             key=jax.random.key(1))
    trainable, frozen = lora_jax.split(adapted, trainable="head")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, shape.vocab, (shape.batch, shape.seq), dtype=np.int32)
    lengths = rng.integers(shape.seq // 2, shape.seq + 1, shape.batch)
    mask = (np.arange(shape.seq)[None, :] < lengths[:, None]).astype(np.int32)
    labels = rng.integers(0, 2, shape.batch, dtype=np.int32)
    batch = tuple(jnp.asarray(x) for x in (ids * mask, mask, labels))
    return Setup(model, params, trainable, frozen, batch, config, dtype)


def losses(s: Setup, dropout: float) -> dict[str, Callable]:
    """The three losses: ``full(params, batch)``, ``lora(trainable, frozen, batch)`` and
    ``frozen_embeddings(rest, embeddings, batch)`` (full FT with the embeddings held out)."""
    wrapped = lora_jax.wrap(s.model.apply)

    def ce(apply, variables, batch):
        ids, mask, labels = batch
        if dropout > 0:
            logits = apply(variables, ids, mask, deterministic=False,
                           rngs={"dropout": jax.random.key(2)})
        else:
            logits = apply(variables, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return {"full": lambda p, b: ce(s.model.apply, p, b),
            "lora": lambda t, f, b: ce(wrapped, lora_jax.combine(t, f), b),
            "frozen_embeddings": lambda r, e, b: ce(s.model.apply, join_embeddings(r, e), b)}


def split_embeddings(params):
    """``(rest, embeddings)``: the encoder's embeddings subtree taken out of `params`."""
    encoder = dict(params["params"]["encoder"])
    embeddings = encoder.pop("embeddings")
    return {"params": {**params["params"], "encoder": encoder}}, embeddings


def join_embeddings(rest, embeddings):
    encoder = {**rest["params"]["encoder"], "embeddings": embeddings}
    return {"params": {**rest["params"], "encoder": encoder}}


# ---------------------------------------------------------------------------------------------
# the measured functions


@dataclasses.dataclass
class Case:
    """One measured function. `fn(*args)`; the first ``len(donate)`` outputs replace the donated
    arguments (positions `donate`) for the next call, so state carries over as in training."""

    kind: str
    name: str
    fn: Callable
    args: tuple
    donate: tuple[int, ...] = ()
    compiled: Any = None
    lower_s: float = math.nan
    compile_s: float = math.nan
    memory: dict = dataclasses.field(default_factory=dict)
    times: list = dataclasses.field(default_factory=list)
    skipped: str | None = None
    check: Callable[[], dict] | None = None  # run once after timing; its dict joins the record
    checked: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    def call(self) -> float:
        """Seconds for one call, ended by `block_until_ready`; carries donated state."""
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.compiled(*self.args))
        dt = time.perf_counter() - t0
        if self.donate:
            args = list(self.args)
            for i, pos in enumerate(self.donate):
                args[pos] = out[i]
            self.args = tuple(args)
        return dt


def fresh(tree):
    """A copy of `tree`'s arrays, so that donating it leaves other cases' arguments intact."""
    return jax.tree.map(jnp.copy, tree)


def train_step(loss, tx):
    def step(p, state, *rest):
        value, grads = jax.value_and_grad(loss)(p, *rest)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value
    return step


def opt_only(tx):
    def update(p, state, grads):
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state
    return update


def optimizers(lr: float) -> dict[str, optax.GradientTransformation]:
    return {"adamw": optax.adamw(lr),
            "adamw_flat": optax.flatten(optax.adamw(lr)),
            "lora_pro": optax.chain(lora_jax.lora_pro(), optax.adamw(lr)),
            "lora_pro_flat": optax.chain(lora_jax.lora_pro(), optax.flatten(optax.adamw(lr))),
            "lora_pro_adamw": lora_jax.lora_pro_adamw(lr)}


def fake_grads(tree):
    """Fixed random 'gradients' shaped as `tree` (optimizer-only timing)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([1e-3 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
                              for i, x in enumerate(leaves)])


def step_cases(s: Setup, loss: dict, opts: dict) -> list[Case]:
    """Train steps: full FT first, then the LoRA methods (the flattened ones last)."""
    full_tx = opts["adamw"]
    cases = [Case("step", "full", train_step(loss["full"], full_tx),
                  (fresh(s.params), full_tx.init(s.params), s.batch), donate=(0, 1))]
    for name, opt in (("lora", "adamw"), ("lora_pro", "lora_pro"),
                      ("lora_pro_adamw", "lora_pro_adamw"), ("lora_flat", "adamw_flat"),
                      ("lora_pro_flat", "lora_pro_flat")):
        tx = opts[opt]
        cases.append(Case("step", name, train_step(loss["lora"], tx),
                          (fresh(s.trainable), tx.init(s.trainable), s.frozen, s.batch), donate=(0, 1)))
    return cases


def grad_cases(s: Setup, loss: dict) -> list[Case]:
    rest, embeddings = split_embeddings(s.params)
    return [Case("grad", "full", jax.grad(loss["full"]), (s.params, s.batch)),
            Case("grad", "full_frozen_embeddings", jax.grad(loss["frozen_embeddings"]),
                 (rest, embeddings, s.batch)),
            Case("grad", "lora", jax.grad(loss["lora"]), (s.trainable, s.frozen, s.batch))]


def opt_cases(s: Setup, opts: dict) -> list[Case]:
    grads = fake_grads(s.trainable)
    return [Case("opt", name, opt_only(tx), (fresh(s.trainable), tx.init(s.trainable), grads),
                 donate=(0, 1)) for name, tx in opts.items()]


def forward_cases(s: Setup) -> list[Case]:
    wrapped = lora_jax.wrap(s.model.apply)
    merged = lora_jax.merge(lora_jax.combine(s.trainable, s.frozen))
    ids, mask, _ = s.batch
    return [Case("forward", "base", lambda p, i, m: s.model.apply(p, i, m), (s.params, ids, mask)),
            Case("forward", "lora_unmerged",
                 lambda t, f, i, m: wrapped(lora_jax.combine(t, f), i, m),
                 (s.trainable, s.frozen, ids, mask)),
            Case("forward", "lora_merged", lambda p, i, m: s.model.apply(p, i, m), (merged, ids, mask))]


def attention_cases(s: Setup) -> list[Case]:
    """Forward + backward of one attention call (grad wrt q, k, v of a fixed projection of its
    output) at the model's shape: XLA always; on GPU cuDNN with the mask as a bias (what the
    model runs) and with key lengths (right padding only)."""
    B, T = s.batch[0].shape
    N, H = s.config.num_attention_heads, s.config.head_dim
    q, k, v, ct = (jax.random.normal(jax.random.key(i), (B, T, N, H), s.dtype) for i in range(4))
    mask = s.batch[1].astype(bool)
    lengths = s.batch[1].sum(-1).astype(jnp.int32)

    def fwd_bwd(attend):
        def f(q, k, v, ct, aux):
            return jax.grad(lambda q, k, v: jnp.vdot(attend(q, k, v, aux).astype(jnp.float32),
                                                     ct.astype(jnp.float32)), (0, 1, 2))(q, k, v)
        return f

    def by_lengths(q, k, v, kv_lengths):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths,
                                            implementation="cudnn")

    impls = {"xla": (lambda q, k, v, m: bert.attention(q, k, v, m, implementation="xla"), mask)}
    if jax.default_backend() == "gpu":
        impls["cudnn"] = (lambda q, k, v, m: bert.attention(q, k, v, m, implementation="cudnn"), mask)
        impls["cudnn_kv_lengths"] = (by_lengths, lengths)
    reference = jax.jit(impls["xla"][0])(q, k, v, mask).astype(jnp.float32)

    def against_xla(attend, aux):
        """Largest |difference| of the forward output from XLA's, relative to XLA's largest."""
        def check():
            out = jax.jit(attend)(q, k, v, aux).astype(jnp.float32)
            err = jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference))
            return {"rel_max_diff_vs_xla": float(err)}
        return check

    return [Case("attention", name, fwd_bwd(attend), (q, k, v, ct, aux),
                 check=against_xla(attend, aux))
            for name, (attend, aux) in impls.items()]


def embedding_cases(s: Setup) -> list[Case]:
    """Gradient of the three embedding lookups (a fixed projection of their bf16 sum)."""
    ids, _, _ = s.batch
    positions = bert.position_ids_for(s.config, ids)
    types = jnp.zeros_like(ids)
    emb = s.params["params"]["encoder"]["embeddings"]
    tables = tuple(emb[n]["embedding"] for n in ("word_embeddings", "position_embeddings",
                                                 "token_type_embeddings"))
    ct = jax.random.normal(jax.random.key(5), ids.shape + (s.config.hidden_size,), s.dtype)
    dt = s.dtype

    def grad_of(lookup):
        def f(tables, ct):
            def total(tables):
                x = sum(lookup(t, i) for t, i in zip(tables, (ids, positions, types)))
                return jnp.vdot(x.astype(jnp.float32), ct.astype(jnp.float32))
            return jax.grad(total)(tables)
        return f

    return [Case("embedding_grad", "gather_then_cast",
                 grad_of(lambda t, i: jnp.take(t, i, axis=0).astype(dt)), (tables, ct)),
            Case("embedding_grad", "cast_then_gather",
                 grad_of(lambda t, i: jnp.take(t.astype(dt), i, axis=0)), (tables, ct))]


def all_cases(s: Setup, args) -> list[Case]:
    """In compile priority order: what the acceptance ratios need first, the rest after."""
    loss = losses(s, args.dropout)
    opts = optimizers(args.lr)
    steps = step_cases(s, loss, opts)
    core, flat = steps[:4], steps[4:]
    return (core + grad_cases(s, loss) + forward_cases(s) + opt_cases(s, opts)
            + attention_cases(s) + embedding_cases(s) + flat)


# ---------------------------------------------------------------------------------------------
# compile, time, report


def compile_deadline(budget_s: float) -> float:
    """Seconds into the run after which nothing more is compiled: the budget less a reserve for
    warm-up and timing (about 12 s for all functions at BERT-base shape on one H200)."""
    return budget_s - max(30.0, 0.1 * budget_s)


def lower_case(case: Case):
    t0 = time.perf_counter()
    lowered = jax.jit(case.fn, donate_argnums=case.donate).lower(*case.args)
    case.lower_s = time.perf_counter() - t0
    return lowered


def compile_case(case: Case, lowered) -> None:
    t0 = time.perf_counter()
    case.compiled = lowered.compile()
    case.compile_s = time.perf_counter() - t0
    case.memory = memory_of(case.compiled)
    if jax.default_backend() == "gpu":  # did the model's attention reach cuDNN's fused kernel?
        text = case.compiled.as_text() or ""
        case.memory["cudnn_fmha_calls"] = text.count('custom_call_target="__cudnn$fmha')


def failed(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e)[:300]}"


def compile_all(cases: list[Case], args, start: float, log=print) -> None:
    """Lower and compile each case in order until the budget less a reserve for timing
    (`compile_deadline`) is spent; the rest are marked skipped, as is any case whose lowering or
    compilation raises (the run goes on). With ``--compile-threads N > 1`` every case is lowered
    first (in order, within the budget) and the compiles run N at a time: faster, but each
    compile_s then includes waiting on the others."""
    def over_budget(case):
        if time.perf_counter() - start > compile_deadline(args.budget_s):
            case.skipped = f"time budget ({args.budget_s:.0f} s) spent before compiling"
            return True
        return False

    def lower(case):
        try:
            return lower_case(case)
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            case.skipped = failed(e)
            return None

    def build(case, lowered):
        try:
            compile_case(case, lowered)
        except Exception as e:  # noqa: BLE001
            case.skipped = failed(e)

    def done(case):
        if case.skipped:
            log(f"  {case.key:43} {case.skipped}")
        else:
            log(f"  compiled {case.key:34} lower {case.lower_s:6.1f} s  compile {case.compile_s:6.1f} s")

    if args.compile_threads <= 1:
        for case in cases:
            if not over_budget(case):
                lowered = lower(case)
                if lowered is not None:
                    build(case, lowered)
                done(case)
        return
    from concurrent.futures import ThreadPoolExecutor

    lowered = [(case, lower(case)) for case in cases if not over_budget(case)]
    lowered = [(case, low) for case, low in lowered if low is not None]
    with ThreadPoolExecutor(args.compile_threads) as pool:
        for (case, _), _ in zip(lowered, pool.map(lambda cl: build(*cl), lowered)):
            done(case)


def run(cases: list[Case], args, start: float, log=print) -> None:
    """Compile (within the budget), warm up (a case that fails here is skipped), then time in
    interleaved rounds (`support.timing`), one call of each case per round, at least 3 rounds and
    no new round once the budget is spent."""
    compile_all(cases, args, start, log)
    for case in cases:
        if case.skipped is None:
            try:
                for _ in range(args.warmup):
                    case.call()
            except Exception as e:  # noqa: BLE001
                case.skipped = failed(e)
                log(f"  {case.key:43} {case.skipped}")
    live = [c for c in cases if c.skipped is None]
    timings = interleave({c.key: c.call for c in live}, args.rounds, warmup=0,
                         keep_going=lambda r: r < 3 or time.perf_counter() - start <= args.budget_s)
    for case in live:
        case.times = timings.times[case.key]
    for case in live:
        if case.check is not None:
            try:
                case.checked = case.check()
            except Exception as e:  # noqa: BLE001
                case.checked = {"check": failed(e)}


def ratio_records(cases: dict[str, Case], torch_full_ms: float | None) -> list[dict]:
    out = []
    timings = Timings({key: case.times for key, case in cases.items()})
    specs = [(n, a, b, g) for n, a, b, g in GOALS] + [(n, a, b, None) for n, a, b in INFO]
    for name, num, den, goal in specs:
        if num in cases and den in cases and cases[num].times and cases[den].times:
            value = timings.ratio(num, den)
            rec = {"kind": "ratio", "name": name, "num": num, "den": den, "value": value, "goal": goal}
            if goal is not None:
                rec["pass"] = bool(value <= goal)
            out.append(rec)
        elif goal is not None:
            out.append({"kind": "ratio", "name": name, "num": num, "den": den, "value": None,
                        "goal": goal, "pass": None, "missing": True})
    if torch_full_ms is not None and cases.get("step/full") and cases["step/full"].times:
        ms = statistics.median(cases["step/full"].times) * 1e3
        out.append({"kind": "ratio", "name": "full step/torch full step", "num": "step/full",
                    "den": f"--torch-full-ms {torch_full_ms}", "value": ms / torch_full_ms,
                    "goal": 1.0, "pass": bool(ms <= torch_full_ms)})
    return out


def env_record(shape: Shape, args, s: Setup, rounds: int) -> dict:
    import flax
    import jaxlib

    dev = jax.devices()[0]
    impl = args.attention if args.attention != "auto" else bert.attention_implementation(
        s.dtype, s.config.head_dim, shape.seq)
    return {"kind": "env", "device": f"{dev.platform} {dev.device_kind}",
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "shape": dataclasses.asdict(shape), "dtype": str(s.dtype), "param_dtype": "float32",
            "rank": args.rank, "alpha": args.alpha, "lr": args.lr, "dropout": args.dropout,
            "attention": impl, "rounds": rounds, "warmup": args.warmup,
            "compile_threads": args.compile_threads,
            "trainable_lora_leaves": len(jax.tree.leaves(s.trainable))}


def case_record(case: Case) -> dict:
    rec = {"kind": case.kind, "name": case.name}
    if case.skipped or not case.times:
        rec["skipped"] = case.skipped or "not timed"
        return rec
    ms = [t * 1e3 for t in case.times]
    rec.update(ms=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), rounds=len(ms),
               lower_s=case.lower_s, compile_s=case.compile_s, **case.memory, **case.checked)
    return rec


def print_table(env: dict, records: list[dict], log=print) -> None:
    log(f"\n# {env['device']}; jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, "
        f"optax {env['optax']}; {env['date']}")
    log(f"# shape {env['shape']}; {env['dtype']} compute, float32 params; rank {env['rank']}, "
        f"alpha {env['alpha']}; attention {env['attention']}; {env['rounds']} rounds")
    log(f"{'measurement':34} {'median ms':>10} {'min ms':>9} {'compile s':>10} "
        f"{'temp MB':>9} {'args MB':>9}")
    for r in records:
        if r["kind"] in ("env", "ratio"):
            continue
        key = f"{r['kind']}/{r['name']}"
        if "skipped" in r:
            log(f"{key:34} skipped: {r['skipped']}")
            continue
        mb = lambda k: f"{r[k] / 1e6:9.1f}" if k in r else f"{'-':>9}"
        log(f"{key:34} {r['ms']:10.3f} {r['ms_min']:9.3f} {r['compile_s']:10.2f} "
            f"{mb('temp_bytes')} {mb('argument_bytes')}")
    log(f"\n{'ratio (median of per-round ratios)':52} {'value':>7} {'goal':>6}  pass")
    for r in records:
        if r["kind"] != "ratio":
            continue
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        goal = "" if r["goal"] is None else f"≤{r['goal']:.2f}"
        ok = "" if r.get("pass") is None else ("yes" if r["pass"] else "NO")
        log(f"{r['name']:52} {value:>7} {goal:>6}  {ok}")


def main(argv=None, log=functools.partial(print, flush=True)) -> list[dict]:
    """Run the benchmark; returns the JSON records (also printed, and written to ``--json``)."""
    args = parse_args(argv)
    start = time.perf_counter()
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    shape = shape_from(args)
    s = build(shape, args)
    cases = all_cases(s, args)
    log(f"# {len(cases)} functions to compile, budget {args.budget_s:.0f} s")
    run(cases, args, start, log)
    by_key = {c.key: c for c in cases if c.times}
    rounds = max((len(c.times) for c in cases), default=0)
    records = ([env_record(shape, args, s, rounds)] + [case_record(c) for c in cases]
               + ratio_records(by_key, args.torch_full_ms))
    records[0]["wall_s"] = time.perf_counter() - start
    print_table(records[0], records, log)
    lines = [json.dumps(r, sort_keys=True) for r in records]
    log("")
    for line in lines:
        log(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write("\n".join(lines) + "\n")
    return records
