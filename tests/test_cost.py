"""Structural cost bounds from XLA's own analyses (exact counts, not timers).

The core issue's benchmark: Flax Linen encoder, 4 layers, d_model 512, FFN 2048, batch 8×128,
LoRA rank 8 on q, k, v, o and both FFN kernels; train step = value and grad wrt `trainable`.
"""

import jax
import jax.extend.core as jex
import pytest

import lora_jax
from bench import transformer as T


def compiled_steps(scan):
    model, params, x, y = T.init(T.Config(scan=scan))
    trainable, frozen = lora_jax.split(lora_jax.apply(params, rank=8))
    full = jax.jit(T.full_step(model)).lower(params, x, y).compile()
    lora = jax.jit(T.lora_step(model)).lower(trainable, frozen, x, y).compile()
    return model, trainable, frozen, x, y, full, lora


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def steps(request):
    return request.param, compiled_steps(request.param)


def test_lora_step_flops_at_most_072_of_full_finetuning(steps):
    scan, (*_, full, lora) = steps
    ratio = lora.cost_analysis()["flops"] / full.cost_analysis()["flops"]
    print(f"scan={scan}: LoRA/full step FLOPs = {ratio:.4f}")
    assert 0.6 < ratio <= 0.72


def _eqn_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for out in eqn.outvars:
            yield eqn.primitive.name, tuple(getattr(out.aval, "shape", ()))
        for sub in _subjaxprs(eqn):
            yield from _eqn_shapes(sub)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for item in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(item, jex.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex.Jaxpr):
                yield item


def test_no_frozen_kernel_sized_gradient_is_computed(steps):
    scan, (model, trainable, frozen, x, y, full, lora) = steps
    kernels = {tuple(n.w.shape) for n in jax.tree.leaves(frozen, is_leaf=lora_jax.is_lora)
               if lora_jax.is_lora(n)}
    # per-layer slices of stacked kernels too
    kernels |= {k[1:] for k in kernels} if scan else set()
    jaxpr = jax.make_jaxpr(T.lora_step(model))(trainable, frozen, x, y).jaxpr
    hits = [(p, s) for p, s in _eqn_shapes(jaxpr) if s in kernels]
    assert not hits, f"ops producing frozen-kernel-shaped values: {hits[:5]}"
    # and the compiled step returns nothing of a kernel's size: only the loss and adapter grads
    out_bytes = lora.memory_analysis().output_size_in_bytes
    adapter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainable)) + 4
    assert adapter_bytes <= out_bytes < adapter_bytes + 1024  # tuple/alignment slack only
    # the same check catches a materialising step: merged weights inside the step do form them
    merged_step = jax.value_and_grad(
        lambda t: T.loss_fn(model)(lora_jax.merge(lora_jax.combine(t, frozen)), x, y))
    bad = [(p, s) for p, s in _eqn_shapes(jax.make_jaxpr(merged_step)(trainable).jaxpr) if s in kernels]
    assert bad


def test_lora_step_temp_memory_against_full_finetuning(steps):
    """Temp bytes of the LoRA step against full FT's, plus full FT's gradient outputs.

    Full FT returns a full-size gradient per kernel (output bytes, not temp); the LoRA step does not.
    On XLA:CPU the LoRA step's temp alone can exceed full FT's temp (its heap packs the extra
    activation-sized summand of ``x@w + s·(x@a)@b`` differently): the figures are printed and the
    bound asserted is on temp + outputs, the live bytes of the step.
    """
    scan, (*_, full, lora) = steps
    f, l = full.memory_analysis(), lora.memory_analysis()
    print(f"scan={scan}: temp LoRA/full = {l.temp_size_in_bytes / f.temp_size_in_bytes:.3f}; "
          f"temp+out LoRA/full = {(l.temp_size_in_bytes + l.output_size_in_bytes) / (f.temp_size_in_bytes + f.output_size_in_bytes):.3f}")
    assert l.temp_size_in_bytes + l.output_size_in_bytes <= 1.15 * (f.temp_size_in_bytes + f.output_size_in_bytes)
