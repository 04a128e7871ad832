"""Float64 oracles shared by the tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.node import LoRA, axis_letters


def randomize_adapters(tree, key, std=0.3):
    """Give every LoRA node random `a` and `b` (b = 0 after init would hide half the maths)."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lora_jax.is_lora)
    out = []
    for i, leaf in enumerate(leaves):
        if lora_jax.is_lora(leaf):
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            leaf = dataclasses.replace(leaf, a=std * jax.random.normal(ka, leaf.a.shape, leaf.a.dtype),
                                       b=std * jax.random.normal(kb, leaf.b.shape, leaf.b.dtype))
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def merged_weight_np(node: LoRA) -> np.ndarray:
    """The oracle: ``w + scale·a@b`` in float64 NumPy."""
    w_spec, a_spec, b_spec = axis_letters(node.roles, node.num_batch_axes)
    a = np.asarray(node.a, np.float64)
    b = np.asarray(node.b, np.float64)
    return np.asarray(node.w, np.float64) + node.scale * np.einsum(f"{a_spec},{b_spec}->{w_spec}", a, b)


def _to64(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.asarray(np.asarray(x, np.float64))
    return x


def rel_err(x, ref) -> float:
    xs = [np.asarray(v, np.float64) for v in jax.tree.leaves(x)]
    rs = [np.asarray(v, np.float64) for v in jax.tree.leaves(ref)]
    assert len(xs) == len(rs) and all(a.shape == b.shape for a, b in zip(xs, rs))
    num = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(xs, rs)))
    den = np.sqrt(sum(np.sum(b ** 2) for b in rs))
    return float(num / den)


def _lora_ab(tree):
    return [(n.a, n.b) for n in jax.tree.leaves(tree, is_leaf=lora_jax.is_lora)
            if lora_jax.is_lora(n)]


def reference64(fn, tree, args, probe):
    """float64 output of ``fn`` on merged weights, and the gradients of ``<fn(...), probe>`` with
    respect to every (a, b) through the merged path ``w + scale·a@b``."""
    with jax.enable_x64(True):
        leaves, treedef = jax.tree.flatten(tree, is_leaf=lora_jax.is_lora)
        nodes = [i for i, leaf in enumerate(leaves) if lora_jax.is_lora(leaf)]
        args64 = jax.tree.map(_to64, args)
        ab64 = [(_to64(leaves[i].a), _to64(leaves[i].b)) for i in nodes]

        def merged(ab):
            out = [_to64(leaf) if not lora_jax.is_lora(leaf) else None for leaf in leaves]
            for (a, b), i in zip(ab, nodes):
                n = leaves[i]
                w_spec, a_spec, b_spec = axis_letters(n.roles, n.num_batch_axes)
                out[i] = _to64(n.w) + n.scale * jnp.einsum(f"{a_spec},{b_spec}->{w_spec}", a, b)
            return jax.tree.unflatten(treedef, out)

        y = jax.jit(lambda ab, args: fn(merged(ab), *args))(ab64, args64)
        probe64 = jax.tree.map(_to64, probe)
        grads = jax.jit(jax.grad(lambda ab, args: _vdot(fn(merged(ab), *args), probe64)))(ab64, args64)
        return jax.tree.map(np.asarray, y), jax.tree.map(np.asarray, grads)


def _vdot(y, probe):
    return sum(jnp.vdot(a.astype(p.dtype), p) for a, p in
               zip(jax.tree.leaves(y), jax.tree.leaves(probe)))


def check_factored(fn, tree, *args, rtol=1e-5, grad_rtol=1e-5, key=jax.random.key(7)):
    """`wrap(fn)` on `tree` equals the float64 merged path, in value and in (a, b) gradients."""
    wrapped = lora_jax.wrap(fn)
    y = jax.jit(wrapped)(tree, *args)
    probe = jax.tree.map(
        lambda v: jax.random.normal(key, v.shape, jnp.float32), y)
    y_ref, g_ref = reference64(fn, tree, args, probe)
    err = rel_err(y, y_ref)
    assert err <= rtol, f"output rel err {err:.2e} > {rtol}"

    trainable, frozen = lora_jax.split(tree)
    g = jax.jit(jax.grad(lambda t: _vdot(wrapped(lora_jax.combine(t, frozen), *args), probe)))(trainable)
    g_ab = _lora_ab(g)
    assert len(g_ab) == len(g_ref) > 0
    gerr = rel_err(g_ab, [tuple(x) for x in g_ref])
    assert gerr <= grad_rtol, f"gradient rel err {gerr:.2e} > {grad_rtol}"
    return err, gerr


class _Stop(Exception):
    pass


def run_until(main, argv, stop_after: int):
    """Run a trainer's ``main(argv)`` but raise out of it right after the checkpoint of step
    `stop_after` (or the first one past it) is written: an interrupted run, for resume tests."""
    import pytest

    from train import checkpoint

    orig = checkpoint.Checkpointer.save

    def save(self, step, tree, meta, *, force=False):
        out = orig(self, step, tree, meta, force=force)
        if step >= stop_after:
            raise _Stop
        return out

    checkpoint.Checkpointer.save = save
    try:
        with pytest.raises(_Stop):
            main(argv)
    finally:
        checkpoint.Checkpointer.save = orig


def lora_pro_state(state) -> lora_jax.LoraProAdamWState:
    """The one `LoraProAdamWState` inside a `lora_pro_adamw` state (it sits in optax.partition's
    inner states)."""
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, lora_jax.LoraProAdamWState))
             if isinstance(x, lora_jax.LoraProAdamWState)]
    assert len(found) == 1, state
    return found[0]
