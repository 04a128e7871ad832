"""The r×r algebra of LoRA-Pro / Riemannian runs once per (rank, compute dtype) group, not per weight.

A 12-layer tree with 6 adapted weights per layer (q/k/v/o (64, 64), ffn_in (64, 256), ffn_out
(256, 64), rank 8), plus rank-4 nodes, a b = 0 node, scan-stacked nodes (leading layer axes, one
with multi-axis roles), bf16 adapters (still float32 algebra, so in the same group) and a plain
trainable leaf. Each transformation's traced `update` must hold at most 2 `eigh` per group (a
per-weight implementation holds 2 per node: 154 here), and the grouped result must equal the
per-node one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from helpers import lora_pro_state
from lora_jax import gram
from lora_jax.projection import adjust_matrices
from lora_jax.node import LoRA, is_lora
from lora_jax.preconditioning import precondition_matrices

LAYERS = 12


def _node(rng, a_shape, b_shape, scale, roles, dtype=jnp.float32):
    a = rng.normal(size=a_shape) / np.sqrt(np.prod(a_shape[-2:]))
    b = rng.normal(size=b_shape) / np.sqrt(np.prod(b_shape[-2:]))
    return LoRA(w=None, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), scale=scale, roles=roles)


def build_tree(seed, layers=LAYERS):
    """(params, grads): same structure, LoRA nodes with w=None (the trainable half)."""
    rng = np.random.default_rng(seed)
    shapes = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64),
              "ffn_in": (64, 256), "ffn_out": (256, 64)}

    def make(rng):
        t = {f"layer_{i}": {name: _node(rng, (I, 8), (8, O), (2.0, 0.5, 1.0)[i % 3], "io")
                            for name, (I, O) in shapes.items()} for i in range(layers)}
        # scan-stacked: a DenseGeneral-like query kernel (L, d, heads, head_dim), rank 8
        t["stacked_q"] = _node(rng, (layers, 64, 8), (layers, 8, 4, 16), 2.0, "ioo")
        # LoRA's step 0 (b = 0) in the same stack: null directions are decided per matrix
        fresh = _node(rng, (64, 8), (8, 64), 2.0, "io")
        t["fresh"] = LoRA(w=None, a=fresh.a, b=jnp.zeros_like(fresh.b), scale=2.0, roles="io")
        # second rank: an unstacked head, bf16 adapters, and two batch axes
        t["head"] = _node(rng, (64, 4), (4, 10), 1.5, "io")
        t["proj_bf16"] = _node(rng, (32, 4), (4, 64), 2.0, "io", jnp.bfloat16)
        t["stacked_r4"] = _node(rng, (2, 3, 32, 4), (2, 3, 4, 48), 0.5, "io")
        t["bias"] = jnp.asarray(rng.normal(size=(64,)), jnp.float32)  # not a LoRA node
        return t

    return make(rng), make(rng)


N_GROUPS = 2  # (8, float32) and (4, float32)


def count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in `jaxpr` and every sub-jaxpr (pjit, scan, cond, …)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "eqns"):
                    n += count_primitive(sub, name)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    n += count_primitive(sub.jaxpr, name)
    return n


def _transforms():
    return {**{f"lora_pro[{x}]": lora_jax.lora_pro(x=x) for x in ("sylvester", "zero", "symmetric")},
            "lora_pro_adamw": lora_jax.lora_pro_adamw(1e-3, weight_decay=0.01),
            "riemannian": lora_jax.riemannian(1e-3)}


@pytest.mark.parametrize("name", list(_transforms()))
def test_eigh_count_is_per_group_not_per_weight(name):
    params, grads = build_tree(0)
    n_nodes = sum(is_lora(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_lora))
    assert n_nodes == 6 * LAYERS + 5
    tx = _transforms()[name]
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(grads, state, params)
    n_eigh = count_primitive(jaxpr.jaxpr, "eigh")
    assert 1 <= n_eigh <= 2 * N_GROUPS, (name, n_eigh)


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


def _tol(dtype):
    # float32: the grouped algebra must agree with the per-node one; bf16 adapters get the output
    # rounded to bf16, where a 1e-7 difference can flip the last bit (2⁻⁸ relative) of an element.
    return 1e-5 if dtype == jnp.float32 else 4e-3


def _mats(p: LoRA, u: LoRA):
    a, b = gram.node_matrices(p.a, p.b, p.roles)
    ga, gb = gram.node_matrices(u.a, u.b, p.roles)
    return tuple(v.astype(jnp.float32) for v in (a, b, ga, gb))


def _check_nodes(out, params, grads, per_node):
    """Every LoRA node of `out` against ``per_node(a, b, ga, gb, scale)`` in matrix form."""
    for key in out:
        p, u, o = params[key], grads[key], out[key]
        nodes = [(f"{key}/{k}", p[k], u[k], o[k]) for k in p] if isinstance(p, dict) else [(key, p, u, o)]
        for path, pn, un, on in nodes:
            if not is_lora(pn):
                continue
            ga_ref, gb_ref = per_node(*_mats(pn, un), pn.scale)
            assert on.a.dtype == pn.a.dtype and on.a.shape == pn.a.shape
            ga_out, gb_out = gram.node_matrices(on.a.astype(jnp.float32), on.b.astype(jnp.float32),
                                                 pn.roles)
            tol = _tol(pn.a.dtype)
            assert _rel(ga_out, ga_ref) <= tol, (path, _rel(ga_out, ga_ref))
            assert _rel(gb_out, gb_ref) <= tol, (path, _rel(gb_out, gb_ref))


# The equality checks compile the whole update on CPU; 2 layers already hold every kind of node
# (all shapes, two scales, both ranks, stacked, bf16, b = 0) at a fraction of the compile time.
EQ_LAYERS = 2


def _per_matrix(mats, decompose):
    """Stand-in for `gram.grouped` that decomposes each node's Gram matrices on their own."""
    return [decompose(m) for m in mats]


@pytest.mark.parametrize("x", ["sylvester", "zero", "symmetric"])
def test_grouped_lora_pro_equals_per_node_adjust_matrices(x):
    params, grads = build_tree(1, layers=EQ_LAYERS)
    tx = lora_jax.lora_pro(x=x)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["bias"], grads["bias"])
    _check_nodes(out, params, grads, lambda a, b, ga, gb, s: adjust_matrices(a, b, ga, gb, s, x=x))


def test_grouped_riemannian_equals_per_node():
    params, grads = build_tree(2, layers=EQ_LAYERS)
    tx = lora_jax.riemannian(1e-3)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["bias"], grads["bias"])
    _check_nodes(out, params, grads, lambda a, b, ga, gb, s: precondition_matrices(a, b, ga, gb, 1e-3))


def test_grouped_lora_pro_adamw_equals_per_node(monkeypatch):
    """Two steps on the whole tree, grouped vs. the per-node algebra (one eigh per Gram matrix,
    as before grouping), both jitted so that only the grouping differs."""
    params, grads = build_tree(3, layers=EQ_LAYERS)

    def two_steps():
        tx = lora_jax.lora_pro_adamw(1e-2, weight_decay=0.1)
        upd = jax.jit(tx.update)
        st = tx.init(params)
        out1, st = upd(grads, st, params)
        return upd(grads, st, optax.apply_updates(params, out1))

    out, st = two_steps()
    monkeypatch.setattr(gram, "grouped", _per_matrix)
    ref_out, ref_st = two_steps()
    monkeypatch.undo()

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
    leaves = [jax.tree_util.tree_leaves(t, is_leaf=is_lora) for t in (out, ref_out)]
    for (path, p), o, ro in zip(flat, *leaves):
        tol = _tol(p.a.dtype if is_lora(p) else p.dtype)
        for got, ref in zip(jax.tree_util.tree_leaves(o), jax.tree_util.tree_leaves(ro)):
            assert _rel(got.astype(jnp.float32), ref.astype(jnp.float32)) <= tol, jax.tree_util.keystr(path)
    # the full-shape first moments, one per LoRA node, in tree order
    nodes = [p for _, p in flat if is_lora(p)]
    mus, ref_mus = (jax.tree.leaves(lora_pro_state(s).mu) for s in (st, ref_st))
    assert len(mus) == len(ref_mus) == len(nodes)
    for p, mu, rmu in zip(nodes, mus, ref_mus):
        assert _rel(mu, rmu) <= _tol(p.a.dtype)
    # the per-node path really was per node
    tx = lora_jax.lora_pro_adamw(1e-2)
    with monkeypatch.context() as mp:
        mp.setattr(gram, "grouped", _per_matrix)
        n = count_primitive(jax.make_jaxpr(tx.update)(grads, tx.init(params), params).jaxpr, "eigh")
    assert n == 2 * (6 * EQ_LAYERS + 5)
