"""QLoRA on SmolLM2-135M-Instruct (the real Q4_1/Q8_0 GGUF): memory of the frozen base and of a
LoRA train step on the 4-bit base against a float32 base, and adapter-gradient agreement.

    python -m bench.qlora_memory [--seq 32] [--batch 1] [--rank 8]

Prints (XLA on whatever backend JAX runs):

* base bytes: every array of the params, quantized (Q4_1 Linear weights, Q8_0 embedding, F32
  norms, loaded with ``load_gguf(keep_quantized=True)``) vs all float32 (``load_gguf``);
* the compiled train step's ``memory_analysis()``: argument and temp bytes, LoRA (rank r on
  q/k/v/o/gate/up/down) on the 4-bit base vs on the float32 base; the frozen half is an argument;
* on one real chat-formatted batch: loss and the relative error of the adapter gradients of the
  4-bit-base step against the float32 dequantized-base step (same adapters, b ≠ 0), both against
  the dequantize-then-merge path (float32 rounding floor), and step time (mean of 3 calls each,
  the two bases interleaved).

Batch 2 by default: on jaxlib 0.10.2's XLA:CPU, a broadcast-multiply-reduce whose operands have a
leading axis of size 1 (the factored product's rank-axis reduction on a (1, T, d) batch) is
miscompiled by the YNNPACK fusion (wrong values; ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``
avoids it), which would make both LoRA steps, 4-bit and float32, disagree with the merged path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.node import LoRA
from lora_jax.quant import quantized_bytes
from support.timing import interleave, timed
from train import llama
from train.assets import smollm2_gguf


def _mib(n):
    return f"{n / 2**20:8.1f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)  # batch 1: see the XLA:CPU note in the docstring
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args(argv)

    path = smollm2_gguf()
    config, fp = llama.load_gguf(path)
    _, qp = llama.load_gguf(path, keep_quantized=True)
    model = llama.Llama(config)
    tok = llama.load_tokenizer(path)

    nq = sum(lora_jax.is_quantized(x) for x in jax.tree.leaves(qp, is_leaf=lora_jax.is_quantized))
    qb, fb = quantized_bytes(qp), quantized_bytes(fp)
    print(f"SmolLM2-135M ({path.name}), {nq} tensors kept quantized")
    print(f"base bytes (arrays):  4-bit {_mib(qb)}   float32 {_mib(fb)}   ratio {qb / fb:.3f}")

    def adapt(params):
        a = lora_jax.apply(params, rank=args.rank, alpha=2 * args.rank, targets=llama.LORA_TARGETS,
                           key=jax.random.key(0))
        keys = iter(jax.random.split(jax.random.key(1), 1000))
        return jax.tree.map(  # b ≠ 0, so the gradients of a are not zero
            lambda n: LoRA(w=n.w, a=n.a, b=0.01 * jax.random.normal(next(keys), n.b.shape), scale=n.scale,
                           roles=n.roles) if lora_jax.is_lora(n) else n,
            a, is_leaf=lambda n: lora_jax.is_lora(n) or lora_jax.is_quantized(n))

    q_train, q_frozen = lora_jax.split(adapt(qp))
    f_train, f_frozen = lora_jax.split(adapt(fp))

    text = tok.chat_ids([{"role": "user", "content": "What is 12 plus 30?"},
                         {"role": "assistant", "content": "12 + 30 = 42. " * 8}], add_generation_prompt=False)
    ids = np.asarray(text[: args.seq], np.int32)
    ids = jnp.asarray(np.tile(ids, (args.batch, 1)))
    fwd = lora_jax.wrap(lambda p, x: model.apply({"params": p}, x))

    def loss(trainable, frozen, ids):
        logits = fwd(lora_jax.combine(trainable, frozen), ids[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    print(f"train step: LoRA r={args.rank} on q,k,v,o,gate,up,down; batch {args.batch} x {ids.shape[1] - 1} tokens")
    compiled = {}
    for name, t, f in (("4-bit", q_train, q_frozen), ("float32", f_train, f_frozen)):
        t0 = time.perf_counter()
        compiled[name] = step.lower(t, f, ids).compile()
        m = compiled[name].memory_analysis()
        print(f"  {name:8s} base: arguments {_mib(m.argument_size_in_bytes)}  temp {_mib(m.temp_size_in_bytes)}"
              f"  output {_mib(m.output_size_in_bytes)}  (compiled in {time.perf_counter() - t0:.0f} s)")
    mq, mf = compiled["4-bit"].memory_analysis(), compiled["float32"].memory_analysis()
    print(f"  ratio 4-bit/float32: arguments {mq.argument_size_in_bytes / mf.argument_size_in_bytes:.3f}, "
          f"temp {mq.temp_size_in_bytes / mf.temp_size_in_bytes:.3f}")

    halves = {"4-bit": (q_train, q_frozen), "float32": (f_train, f_frozen)}
    results = {}
    for name, (t, f) in halves.items():
        value, grads = jax.block_until_ready(compiled[name](t, f, ids))
        results[name] = (float(value), grads)
    timings = interleave({name: timed(lambda name=name, t=t, f=f: compiled[name](t, f, ids))
                          for name, (t, f) in halves.items()}, 3, warmup=0)
    step_s = {name: statistics.mean(ts) for name, ts in timings.times.items()}
    # the literal dequantize-then-LoRA path: merged float32 weights w + s·a@b, plain autodiff; its
    # disagreement with the factored float32 step is the float32 rounding floor of this comparison
    plain = lambda p, x: model.apply({"params": p}, x)

    def merged_loss(trainable, frozen, ids):
        logits = plain(lora_jax.merge(lora_jax.combine(trainable, frozen)), ids[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    mval, mgrads = jax.jit(jax.value_and_grad(merged_loss))(f_train, f_frozen, ids)
    results["merged"] = (float(mval), mgrads)
    ab = lambda g: [np.asarray(x, np.float64) for n in jax.tree.leaves(g, is_leaf=lora_jax.is_lora)
                    if lora_jax.is_lora(n) for x in (n.a, n.b)]
    gq, gf = ab(results["4-bit"][1]), ab(results["float32"][1])
    rel = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(gq, gf)) / sum((b ** 2).sum() for b in gf))
    worst = max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(gq, gf))
    print(f"real batch: loss 4-bit {results['4-bit'][0]:.6f}, float32 dequantized {results['float32'][0]:.6f}")
    print(f"adapter gradients, 4-bit base vs float32 dequantized base: rel err {rel:.2e} "
          f"(worst single factor {worst:.2e})")
    gm = ab(results["merged"][1])
    for name, g in (("4-bit factored", gq), ("float32 factored", gf)):
        r = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g, gm)) / sum((b ** 2).sum() for b in gm))
        print(f"  {name} vs dequantize-then-merge (float32, plain autodiff): rel err {r:.2e}")
    print(f"step time: 4-bit {step_s['4-bit'] * 1e3:.0f} ms, float32 {step_s['float32'] * 1e3:.0f} ms "
          f"({jax.devices()[0].platform})")


if __name__ == "__main__":
    main()
