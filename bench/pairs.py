"""LoRA factors as sibling leaves (Qwix / Tunix): what `lora_jax.paired` and `lora_jax.wrap` cost.

Three side-by-sides, each in one process, wall times interleaved (`support.timing`: medians, and
medians of per-round ratios), FLOPs from XLA's `cost_analysis`, temp bytes from `memory_analysis`:

1. the optimizer update on 72 rank-8 pairs (12 layers × q, k, v, o, ffn_in, ffn_out): `paired(tx)`
   on sibling leaves vs `tx` on lora_jax's own nodes, for `lora_pro()` and `lora_pro_adamw`;
2. a Tunix Qwen3 at a small config (random weights) with Qwix LoRA (rank 8 on every projection):
   one AdamW LoRA step executed by Qwix (its interception of einsum / dot_general) vs by
   `lora_jax.wrap` on the same base weights and adapters;
3. on those Qwix pairs, LoRA-Pro's step (`paired(chain(lora_pro(), adamw))`, `paired(lora_pro_adamw)`)
   relative to plain AdamW.

    python -m bench.pairs [--rounds 15] [--layers 4 --embed 256 --seq 128 --batch 4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.models.dummy_model_creator import create_dummy_model
from tunix.models.qwen3 import model as qwen3
from tunix.sft import utils as sft_utils

import lora_jax
from lora_jax.node import LoRA
from support.probes import flops, memory_of
from support.qwix_nodes import own_nodes, qwix_factors
from support.timing import interleave, timed


def _table(title, rows, base):
    print(f"\n### {title}\n")
    print("| variant | GFLOP | FLOPs / base | temp MiB | median ms | time / base |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['flops'] / 1e9:.4f} | {r['flops'] / rows[base]['flops']:.4f} | "
              f"{r['temp'] / 2**20:.1f} | {r['ms']:.2f} | {r['ratio']:.3f} |")


def _measure(compiled_calls: dict, rounds: int, base: str) -> dict:
    """compiled_calls: name -> (compiled, args)."""
    t = interleave({k: timed(lambda c=c, a=a: c(*a)) for k, (c, a) in compiled_calls.items()}, rounds)
    return {k: {"flops": flops(c), "temp": memory_of(c).get("temp_bytes", 0), "ms": 1e3 * t.median(k),
                "ratio": t.ratio(k, base)} for k, (c, _) in compiled_calls.items()}


def _pairs_tree(seed, layers=12, r=8):
    rng = np.random.default_rng(seed)
    shapes = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64), "ffn_in": (64, 256),
              "ffn_out": (256, 64)}
    f = lambda s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-1]), jnp.float32)
    own = {f"layer_{i}": {n: LoRA(w=None, a=f((I, r)), b=f((r, O)), scale=2.0, roles="io")
                          for n, (I, O) in shapes.items()} for i in range(layers)}
    sib = jax.tree.map(lambda n: {"kernel_lora_a": n.a, "kernel_lora_b": n.b}, own,
                       is_leaf=lambda x: isinstance(x, LoRA))
    return own, sib


def update_cost(rounds):
    (own, sib), (own_g, sib_g) = _pairs_tree(0), _pairs_tree(1)
    for name, make in {"lora_pro()": lora_jax.lora_pro,
                       "lora_pro_adamw(1e-3)": lambda: lora_jax.lora_pro_adamw(1e-3)}.items():
        tx, ptx = make(), lora_jax.paired(make(), scale=2.0)
        calls = {"own nodes": (jax.jit(tx.update).lower(own_g, tx.init(own), own).compile(),
                               (own_g, tx.init(own), own)),
                 "paired (sibling leaves)": (jax.jit(ptx.update).lower(sib_g, ptx.init(sib), sib).compile(),
                                             (sib_g, ptx.init(sib), sib))}
        _table(f"{name} update, 72 pairs rank 8", _measure(calls, rounds, "own nodes"), "own nodes")


def qwen3_with_qwix(args):
    cfg = qwen3.ModelConfig(num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.embed,
                            hidden_dim=4 * args.embed, num_heads=args.embed // 64, head_dim=64,
                            num_kv_heads=max(1, args.embed // 128), rope_theta=10_000, norm_eps=1e-6)
    base = create_dummy_model(qwen3.Qwen3, cfg, scale=0.05)
    provider = qwix.LoraProvider(module_path=r".*_proj", rank=args.rank, alpha=2.0 * args.rank)
    lm = qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(1), **base.get_model_input())
    # b = 0 after init: give both factors values, so both executions do the same work on real numbers
    key = jax.random.key(2)
    nnx.update(lm, jax.tree.map(lambda x: 0.02 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape),
                                nnx.as_pure(nnx.state(lm, nnx.LoRAParam))))
    tokens = jax.random.randint(jax.random.key(3), (args.batch, args.seq), 0, cfg.vocab_size)
    mask = jnp.ones_like(tokens, bool)
    inputs = (tokens, sft_utils.build_positions_from_mask(mask), None, sft_utils.make_causal_attn_mask(mask))
    return cfg, base, lm, tokens, inputs


def lm_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def qwix_step_fn(lm, tokens, inputs, tx):
    graphdef, lora_state, rest = nnx.split(lm, nnx.LoRAParam, ...)

    def step(lora_state, opt_state, rest):
        def loss(ls):
            return lm_loss(nnx.merge(graphdef, ls, rest)(*inputs)[0], tokens)
        value, g = jax.value_and_grad(loss)(lora_state)
        u, opt_state = tx.update(g, opt_state, lora_state)
        return optax.apply_updates(lora_state, u), opt_state, value

    args = (lora_state, tx.init(lora_state), rest)
    return jax.jit(step).lower(*args).compile(), args


def execution(args, rounds):
    cfg, base, lm, tokens, inputs = qwen3_with_qwix(args)
    scale = 2.0
    tx = optax.adamw(1e-3)
    calls = {"Qwix execution": qwix_step_fn(lm, tokens, inputs, tx)}
    graphdef, tree = own_nodes(base, qwix_factors(lm), scale)
    trainable, frozen = lora_jax.split(tree)
    model_fn = lora_jax.wrap(lambda st: nnx.merge(graphdef, st)(*inputs)[0])

    def own_step(t, s, frozen):
        value, g = jax.value_and_grad(lambda t: lm_loss(model_fn(lora_jax.combine(t, frozen)), tokens))(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, value

    own_args = (trainable, tx.init(trainable), frozen)
    calls["lora_jax.wrap"] = (jax.jit(own_step).lower(*own_args).compile(), own_args)
    # the same loss and the same adapters: the two executions agree before they are timed
    l_q, l_o = (float(c(*a)[2]) for c, a in calls.values())
    print(f"\n# Qwen3 {cfg.num_layers} layers, d {cfg.embed_dim}, vocab {cfg.vocab_size}, batch "
          f"{args.batch}x{args.seq}, Qwix LoRA rank {args.rank} on every projection; loss Qwix {l_q:.6f}, "
          f"lora_jax {l_o:.6f}")
    _table("one AdamW LoRA step: Qwix vs lora_jax.wrap, same adapters",
           _measure(calls, rounds, "Qwix execution"), "Qwix execution")

    variants = {"AdamW": optax.adamw(1e-3),
                "paired(chain(lora_pro(), adamw))": lora_jax.paired(optax.chain(lora_jax.lora_pro(),
                                                                                optax.adamw(1e-3)), scale=scale),
                "paired(lora_pro_adamw)": lora_jax.paired(lora_jax.lora_pro_adamw(1e-3), scale=scale)}
    calls = {k: qwix_step_fn(lm, tokens, inputs, v) for k, v in variants.items()}
    _table("LoRA-Pro on Qwix's pairs vs AdamW (Qwix execution)", _measure(calls, rounds, "AdamW"), "AdamW")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embed", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"# device {dev.platform} {dev.device_kind}; jax {jax.__version__}, qwix "
          f"{getattr(qwix, '__version__', '?')}; rounds {args.rounds}")
    update_cost(args.rounds)
    execution(args, args.rounds)


if __name__ == "__main__":
    main()
