"""QLoRA: quantized frozen weights (`lora_jax.quant`) dequantized inside the factored product.

Dequantization against ``gguf.quants.dequantize`` (bit-exact, Q4_1/Q8_0) and a NumPy NF4 reference;
the NF4 error on Gaussian weights; forward and adapter gradients against the float64 oracle of
the dequantized weights (an MLP, and the tiny GGUF Llama of tests/test_llama.py loaded with
``keep_quantized=True``); and structure: the train step's frozen-base argument bytes, JAX's saved
residuals and XLA's temp bytes (no float copy of a full weight kept across the step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from helpers import _lora_ab, _vdot, reference64, rel_err
from lora_jax._compat import saved_residuals
from lora_jax.node import LoRA
from lora_jax.quant import NF4_CODEBOOK, quantize
from train.gguf_blocks import from_gguf_blocks

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


# ------------------------------------------------------------------------------------------------
# dequantization


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_bit_exact(qtype):
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(48, 160)) * rng.uniform(0.01, 3, size=(48, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block (d = 0)
    raw = gguf.quants.quantize(w, Q[qtype])
    ref = gguf.quants.dequantize(raw, Q[qtype])
    q = from_gguf_blocks(raw, qtype)
    ours = np.asarray(jax.jit(lambda q: q.dequantize())(q))
    assert ours.dtype == np.float32 and np.array_equal(ours, ref)
    # the (out, in) → (in, out) transpose is a layout flag; `.T` under wrap flips it back
    qt = from_gguf_blocks(raw, qtype, transposed=True)
    assert qt.shape == (160, 48) and np.array_equal(np.asarray(qt.dequantize()), ref.T)
    back = lora_jax.wrap(lambda q: q.T * 1.0)
    with pytest.warns(lora_jax.LoRAMaterializationWarning, match="quantized weight"):
        assert np.array_equal(np.asarray(back(qt)), ref)  # `* 1.0` has no rule: dequantized
    # our quantizer writes gguf's blocks
    own = quantize(jnp.asarray(w), qtype.lower())
    assert np.array_equal(np.asarray(own.codes), np.asarray(q.codes))
    assert np.array_equal(np.asarray(own.scale), np.asarray(q.scale))
    assert q.nbytes == raw.nbytes


def nf4_reference(w, block=64):
    """NumPy NF4 (QLoRA): per block of 64 along the last axis, absmax, nearest code, decode."""
    x = np.asarray(w, np.float32).reshape(-1, block)
    absmax = np.abs(x).max(1, keepdims=True)
    idx = np.abs(x[..., None] / np.where(absmax == 0, 1, absmax)[..., None] - NF4_CODEBOOK).argmin(-1)
    return (NF4_CODEBOOK[idx] * absmax).reshape(np.shape(w)), idx


def test_nf4_codebook_is_qloras():
    scipy_stats = pytest.importorskip("scipy.stats")
    offset = 0.9677083  # bitsandbytes' create_normal_map
    pos = scipy_stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -scipy_stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(NF4_CODEBOOK, v / np.abs(v).max(), atol=1e-7)


def test_nf4_matches_numpy_reference_and_packs_two_codes_per_byte():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 256)).astype(np.float32)
    w[0, :64] = 0.0
    q = quantize(jnp.asarray(w), "nf4")
    ref, idx = nf4_reference(w)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (32, 4, 32) and q.scale.dtype == jnp.float32
    ours = np.asarray(jax.jit(lambda q: q.dequantize())(q))
    # ties (a value exactly between two codes) may round either way: compare codes elsewhere
    assert np.mean(ours == ref) > 0.999 and np.abs(ours - ref).max() <= 0.14 * np.abs(w).max()
    packed = np.asarray(q.codes).reshape(-1)
    assert np.array_equal((packed >> 4), idx.reshape(-1)[0::2]) or np.mean(
        (packed >> 4) == idx.reshape(-1)[0::2]) > 0.999
    # bf16 output; a last axis that is not a whole number of blocks is zero-padded
    odd = quantize(jnp.asarray(w[:, :100]), "nf4", dtype=jnp.bfloat16)
    assert odd.shape == (32, 100) and odd.dtype == jnp.bfloat16 and odd.pad == 28
    np.testing.assert_allclose(np.asarray(odd.dequantize(jnp.float32)), nf4_reference(
        np.pad(w[:, :100], [(0, 0), (0, 28)]))[0][:, :100], atol=1e-6)


def test_nf4_error_on_gaussian_weights():
    """NF4 of N(0, σ²) weights: relative RMS error ≤ 0.11 (measured 0.092), and each element within
    half the widest code gap (0.1385) times its block's absmax."""
    w = jax.random.normal(jax.random.key(0), (512, 1024)) * 0.02
    d = quantize(w, "nf4").dequantize()
    rel = float(jnp.linalg.norm(d - w) / jnp.linalg.norm(w))
    print(f"NF4 relative RMS error on Gaussian weights: {rel:.4f}")
    assert rel <= 0.11
    absmax = jnp.abs(w.reshape(-1, 64)).max(1, keepdims=True)
    half_gap = np.diff(NF4_CODEBOOK).max() / 2
    assert bool(jnp.all(jnp.abs((d - w).reshape(-1, 64)) <= half_gap * absmax * (1 + 1e-6)))


# ------------------------------------------------------------------------------------------------
# factored product on a quantized base == the dequantize-then-LoRA path


def dequantized_tree(tree):
    """Every quantized `w` (and standalone quantized leaf) replaced by its float32 dequantization."""
    def f(x):
        if lora_jax.is_lora(x) and lora_jax.is_quantized(x.w):
            return LoRA(w=x.w.dequantize(), a=x.a, b=x.b, scale=x.scale, roles=x.roles, dropout=x.dropout)
        return x.dequantize() if lora_jax.is_quantized(x) else x
    special = lambda x: lora_jax.is_lora(x) or lora_jax.is_quantized(x)
    return jax.tree_util.tree_map(f, tree, is_leaf=special)


def check_against_dequantized(fn, tree, *args, rtol=1e-5):
    """`wrap(fn)` on the quantized `tree` vs the float64 merged path of its dequantized weights:
    output and (a, b) gradients of ``<fn, probe>``."""
    wrapped = lora_jax.wrap(fn, strict=True)
    y = jax.jit(wrapped)(tree, *args)
    probe = jax.random.normal(jax.random.key(3), y.shape, jnp.float32)
    y_ref, g_ref = reference64(fn, dequantized_tree(tree), args, probe)
    trainable, frozen = lora_jax.split(tree)
    g = jax.jit(jax.grad(lambda t: _vdot(wrapped(lora_jax.combine(t, frozen), *args), probe)))(trainable)
    err, gerr = rel_err(y, y_ref), rel_err(_lora_ab(g), [tuple(x) for x in g_ref])
    assert err <= rtol and gerr <= rtol, (err, gerr)
    return err, gerr


def mlp(p, x):
    h = jax.nn.gelu(x @ p["w1"])
    h = jax.nn.gelu(h @ p["w2"])
    return h @ p["w3"].T  # w3 is stored (out, in): `.T` is its layout flag


def test_mlp_grads_equal_dequantized_path():
    """One format per weight: w1 NF4 and w2 Q4_1 in LoRA nodes, w3 Q8_0 outside any."""
    k = jax.random.split(jax.random.key(0), 5)
    p = {"w1": 0.1 * jax.random.normal(k[0], (64, 128)), "w2": 0.1 * jax.random.normal(k[1], (128, 96)),
         "w3": 0.1 * jax.random.normal(k[2], (32, 96))}
    x = jax.random.normal(k[3], (6, 64))
    adapted = lora_jax.apply(p, rank=4, alpha=8, targets="w1", quantize="nf4", key=k[4])
    adapted["w2"] = lora_jax.apply({"w2": p["w2"]}, rank=4, alpha=8, quantize="q4_1", key=k[4])["w2"]
    adapted["w3"] = quantize(p["w3"], "q8_0")  # a quantized weight outside any LoRA node
    adapted = jax.tree_util.tree_map(  # b ≠ 0
        lambda n: LoRA(w=n.w, a=n.a, b=n.b + 0.05, scale=n.scale, roles=n.roles) if lora_jax.is_lora(n) else n,
        adapted, is_leaf=lambda n: lora_jax.is_lora(n) or lora_jax.is_quantized(n))
    assert all(lora_jax.is_quantized(adapted[n].w) for n in ("w1", "w2"))
    err, gerr = check_against_dequantized(mlp, adapted, x)
    print(f"MLP on NF4/Q4_1/Q8_0: output rel err {err:.1e}, adapter grads rel err {gerr:.1e}")
    # split keeps the quantized blocks in the frozen half; merge gives a float weight
    trainable, frozen = lora_jax.split(adapted)
    assert lora_jax.is_quantized(frozen["w1"].w) and trainable["w1"].w is None
    assert lora_jax.is_quantized(frozen["w3"]) and trainable["w3"] is None
    merged = lora_jax.merge(adapted)
    assert isinstance(merged["w1"], jax.Array) and merged["w1"].dtype == jnp.float32
    np.testing.assert_allclose(merged["w1"], adapted["w1"].w.dequantize() + adapted["w1"].delta(), atol=1e-6)
    # materialising a quantized LoRA dequantizes it, with the usual warning
    with pytest.warns(lora_jax.LoRAMaterializationWarning):
        lora_jax.wrap(lambda n: jnp.sin(n))(adapted["w1"])


def test_quantized_embedding_lookup_and_tied_head():
    table = jax.random.normal(jax.random.key(0), (50, 64))
    q = quantize(table, "q8_0")
    ids = jnp.asarray([[3, 7, 49], [0, 0, 12]])

    def f(t, x):
        return jnp.take(t, ids, axis=0).sum(1) @ t.T + x.sum()

    ours = jax.jit(lora_jax.wrap(f, strict=True))(q, jnp.ones(3))
    ref = f(q.dequantize(), jnp.ones(3))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    g = jax.grad(lambda x: lora_jax.wrap(lambda t, x: (jnp.tanh(x @ t.T) ** 2).sum())(q, x))(table[:4])
    g_ref = jax.grad(lambda x: (jnp.tanh(x @ q.dequantize().T) ** 2).sum())(table[:4])
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the tiny GGUF Llama, loaded with keep_quantized


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    import test_llama as tl
    from train import llama

    tok = tl.train_tiny_bpe()
    path = tmp_path_factory.mktemp("qllama") / "tiny.gguf"
    tl.write_tiny_gguf(path, tok)
    # every Linear weight Q4_1, the embedding Q8_0: the structural checks
    all_q = {tl.gguf_name(hf): (Q.Q8_0 if "embed" in hf else Q.Q4_1)
             for hf in tl.random_hf_weights(len(tl.bpe_tables(tok)[0]), True)
             if "norm" not in hf}
    path_all = path.parent / "tiny_all_q.gguf"
    saved = tl.QUANTIZED
    tl.QUANTIZED = all_q
    try:
        tl.write_tiny_gguf(path_all, tok)
    finally:
        tl.QUANTIZED = saved
    return dict(path=path, path_all=path_all, llama=llama, quantized_names=dict(tl.QUANTIZED))


def test_keep_quantized_loads_blocks_and_matches_float_load(tiny_q):
    llama = tiny_q["llama"]
    config, fp = llama.load_gguf(tiny_q["path"])
    _, qp = llama.load_gguf(tiny_q["path"], keep_quantized=True)
    q = qp["layers_0"]["self_attn"]["q_proj"]["kernel"]  # Q4_1, rows unpermuted as raw blocks
    assert lora_jax.is_quantized(q) and q.format == "q4_1" and q.transposed and q.shape == (64, 64)
    assert lora_jax.is_quantized(qp["embed_tokens"]["embedding"]) and not qp["embed_tokens"]["embedding"].transposed
    assert lora_jax.is_quantized(qp["layers_1"]["self_attn"]["k_proj"]["kernel"])
    assert not lora_jax.is_quantized(qp["layers_0"]["self_attn"]["v_proj"]["kernel"])  # F32 in the file
    special = lambda x: lora_jax.is_quantized(x)
    for path, leaf in jax.tree_util.tree_flatten_with_path(qp, is_leaf=special)[0]:
        ref = jax.tree_util.tree_flatten_with_path(fp)[0]
        ref = dict((jax.tree_util.keystr(p), v) for p, v in ref)[jax.tree_util.keystr(path)]
        got = leaf.dequantize() if special(leaf) else leaf
        assert np.array_equal(np.asarray(got), np.asarray(ref)), path
    model = llama.Llama(config)
    ids = jnp.asarray([[5, 77, 130, 9, 250, 31, 64, 2]])
    fwd = lambda p, x: model.apply({"params": p}, x)
    np.testing.assert_allclose(lora_jax.wrap(fwd, strict=True)(qp, ids), fwd(fp, ids), rtol=1e-5, atol=1e-5)
    assert llama._has_lora(qp) and not llama._has_lora(fp)  # `generate` wraps quantized params


def tiny_adapted(tiny_q, which="path"):
    llama = tiny_q["llama"]
    config, qp = llama.load_gguf(tiny_q[which], keep_quantized=True)
    model = llama.Llama(config)
    adapted = lora_jax.apply(qp, rank=4, alpha=8, targets=llama.LORA_TARGETS, key=jax.random.key(0))
    adapted = jax.tree_util.tree_map(
        lambda n: LoRA(w=n.w, a=n.a, b=0.1 * jnp.ones_like(n.b), scale=n.scale, roles=n.roles)
        if lora_jax.is_lora(n) else n, adapted,
        is_leaf=lambda n: lora_jax.is_lora(n) or lora_jax.is_quantized(n))
    return config, model, qp, adapted


def test_tiny_llama_lora_on_quantized_base_equals_dequantized_path(tiny_q):
    config, model, _, adapted = tiny_adapted(tiny_q)
    nodes = [n for n in jax.tree_util.tree_leaves(adapted, is_leaf=lora_jax.is_lora) if lora_jax.is_lora(n)]
    assert len(nodes) == 14 and sum(lora_jax.is_quantized(n.w) for n in nodes) == 4
    ids = jnp.asarray([[5, 77, 130, 9, 250, 31, 64, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    err, gerr = check_against_dequantized(lambda p, x: model.apply({"params": p}, x), adapted, ids)
    print(f"tiny Llama, quantized base: logits rel err {err:.1e}, adapter grads rel err {gerr:.1e}")


# ------------------------------------------------------------------------------------------------
# structure: what the train step holds


def _loss(model):
    fwd = lora_jax.wrap(lambda p, x: model.apply({"params": p}, x))

    def loss(trainable, frozen, ids):
        logits = fwd(lora_jax.combine(trainable, frozen), ids)
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[..., 0])
    return loss


def test_train_step_holds_quantized_base_only(tiny_q):
    """All-quantized tiny Llama (Q4_1 Linear, Q8_0 embedding): the frozen base's bytes among the
    compiled step's arguments are ≤ 0.3× the float32 base's (Q4_1 stores 5 bits per weight with
    its scales, Q8_0 8.5), and no float residual of a weight's shape is saved for the backward."""
    config, model, qp, adapted = tiny_adapted(tiny_q, "path_all")
    trainable, frozen = lora_jax.split(adapted)
    f_train, f_frozen = lora_jax.split(dequantized_tree(adapted))
    ids = jnp.asarray([[5, 77, 130, 9, 250, 31, 64, 2]] * 2)
    loss = _loss(model)
    step = jax.jit(jax.value_and_grad(loss))
    arg = lambda t, f: step.lower(t, f, ids).compile().memory_analysis().argument_size_in_bytes
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
    rest = nbytes(trainable) + nbytes(ids)
    q_base, f_base = arg(trainable, frozen) - rest, arg(f_train, f_frozen) - rest
    assert abs(q_base - nbytes(frozen)) < 1024 and abs(f_base - nbytes(f_frozen)) < 1024
    print(f"tiny Llama frozen base in the step's arguments: {q_base} B quantized vs {f_base} B float32 "
          f"({q_base / f_base:.3f}x)")
    assert q_base <= 0.3 * f_base
    # JAX's saved residuals: the blocks, never a float value of a weight's shape
    shapes = set()
    for n in jax.tree_util.tree_leaves(adapted, is_leaf=lora_jax.is_quantized):
        if lora_jax.is_quantized(n):
            shapes |= {tuple(n.shape), tuple(n.shape[::-1])}
    res = saved_residuals(lambda t: loss(t, frozen, ids), trainable)
    bad = [(r[0].str_short(), r[1]) for r in res
           if jnp.issubdtype(r[0].dtype, jnp.floating) and tuple(r[0].shape) in shapes]
    assert not bad, bad
    kept = [r[0] for r in res if jnp.issubdtype(r[0].dtype, jnp.integer) and r[0].ndim == 3]
    assert len(kept) >= 14  # the codes are what the backward pass keeps
    # the check sees a float weight: the dequantized base's residuals hold them
    res_f = saved_residuals(lambda t: loss(t, f_frozen, ids), f_train)
    assert any(tuple(r[0].shape) in shapes for r in res_f)


def test_compiled_step_keeps_no_dequantized_weight_alive():
    """XLA temp bytes of a LoRA step on a quantized MLP whose weights (4 MiB each in float32) dwarf
    its activations: one dequantized weight is live at a time, however deep the MLP (measured
    4.06-4.08 MiB for 1-6 layers on XLA:CPU). Without the dequantization's data dependence on the
    layer's input/cotangent (`lora_jax.product.dequantize_at`), XLA hoists every layer's dequantization to the
    start and reuses it in the backward pass: 4 MiB per layer, all kept across the step."""
    d = 1024

    def temp(layers):
        k = jax.random.split(jax.random.key(0), layers + 1)
        p = {f"w{i}": 0.03 * jax.random.normal(k[i], (d, d)) for i in range(layers)}
        x = jax.random.normal(k[-1], (4, d))
        trainable, frozen = lora_jax.split(lora_jax.apply(p, rank=8, quantize="nf4", key=k[-1]))

        def loss(t, frozen, x):  # frozen as an argument: as a constant, XLA would fold it
            def f(p, x):
                for i in range(layers):
                    x = jnp.tanh(x @ p[f"w{i}"])
                return (x ** 2).sum()
            return lora_jax.wrap(f)(lora_jax.combine(t, frozen), x)

        step = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, x).compile()
        return step.memory_analysis().temp_size_in_bytes

    weight = d * d * 4
    t2, t4 = temp(2), temp(4)
    print(f"quantized MLP step temp: {t2 / 2**20:.2f} MiB (2 layers), {t4 / 2**20:.2f} MiB (4 layers); "
          f"one float weight {weight / 2**20:.0f} MiB")
    assert t4 <= 1.5 * weight and t4 - t2 < 0.25 * weight
