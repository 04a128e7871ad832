"""LoRA-Pro from the JAX LLM stack: Qwix's LoRA (Tunix, MaxText), Tunix's `PeftTrainer`, Flax NNX's
`nnx.LoRALinear`, through `lora_jax.paired`, and `lora_jax.merge_pairs` for their export.

The oracle throughout is lora_jax on its own `LoRA` nodes holding the same base weights and
factors: their forward (through `lora_jax.wrap`), gradients and optimizer updates must equal what
the other library's sibling-leaf trees give.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

qwix = pytest.importorskip("qwix")

import lora_jax  # noqa: E402
from lora_jax.node import LoRA, is_lora  # noqa: E402
from lora_jax.paths import path_str  # noqa: E402
from support.qwix_nodes import by_path, flat_nodes, own_nodes, qwix_factors  # noqa: E402

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


# ------------------------------------------------------------------------------------------------
# a small NNX transformer with einsum attention (what Tunix's models look like)
# ------------------------------------------------------------------------------------------------

class Attention(nnx.Module):
    def __init__(self, d, heads, head_dim, *, rngs, dtype):
        init = nnx.initializers.normal(d ** -0.5)
        self.q = nnx.Param(init(rngs.params(), (d, heads, head_dim), dtype))
        self.k = nnx.Param(init(rngs.params(), (d, heads, head_dim), dtype))
        self.v = nnx.Param(init(rngs.params(), (d, heads, head_dim), dtype))
        self.o = nnx.Param(init(rngs.params(), (heads, head_dim, d), dtype))

    def __call__(self, x):
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...])
        k = jnp.einsum("bsd,dhk->bshk", x, self.k[...])
        v = jnp.einsum("bsd,dhk->bshk", x, self.v[...])
        t = x.shape[1]
        logits = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
        ctx = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, -1), v)
        return jnp.einsum("bthk,hkd->btd", ctx, self.o[...])


class Block(nnx.Module):
    def __init__(self, d, heads, head_dim, hidden, *, rngs, dtype):
        self.norm1 = nnx.RMSNorm(d, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.attn = Attention(d, heads, head_dim, rngs=rngs, dtype=dtype)
        self.norm2 = nnx.RMSNorm(d, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.up = nnx.Linear(d, hidden, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.down = nnx.Linear(hidden, d, rngs=rngs, param_dtype=dtype, dtype=dtype)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    def __init__(self, *, vocab=40, d=24, heads=2, head_dim=8, hidden=48, layers=2, rngs, dtype=jnp.float32):
        self.embed = nnx.Embed(vocab, d, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.blocks = nnx.List([Block(d, heads, head_dim, hidden, rngs=rngs, dtype=dtype)
                                for _ in range(layers)])
        self.head = nnx.Linear(d, vocab, rngs=rngs, param_dtype=dtype, dtype=dtype)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def lm_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


TARGETS = r".*attn|.*up|.*down"


def qwix_model(dtype=jnp.float32, seed=0):
    """(base model, Qwix-LoRA model, tokens); the factors randomised (b = 0 hides half the maths)."""
    tokens = jax.random.randint(jax.random.key(seed + 100), (3, 10), 0, 40)
    base = TinyLM(rngs=nnx.Rngs(seed), dtype=dtype)
    provider = qwix.LoraProvider(module_path=TARGETS, rank=RANK, alpha=ALPHA)
    lm = qwix.apply_lora_to_model(base, provider, tokens, rngs=nnx.Rngs(seed + 1))
    factors = nnx.state(lm, nnx.LoRAParam)
    key = jax.random.key(seed + 2)
    noisy = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape, x.dtype),
                         nnx.as_pure(factors))
    nnx.update(lm, noisy)
    return base, lm, tokens


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def qwix_and_own_updates(dtype, make_tx):
    """Gradients (Qwix's vs lora_jax's through `wrap`), then two steps of `make_tx()` on Qwix's
    pairs (through `paired`) and on lora_jax's own nodes given the same gradients; returns the
    largest relative difference of each."""
    base, lm, tokens = qwix_model(dtype)
    factors = qwix_factors(lm)
    graphdef, tree = own_nodes(base, factors, SCALE)
    trainable, frozen = lora_jax.split(tree)

    def own_loss(t):
        model_fn = lora_jax.wrap(lambda st: nnx.merge(graphdef, st)(tokens))
        return lm_loss(model_fn(lora_jax.combine(t, frozen)), tokens)

    q_params = nnx.as_pure(nnx.state(lm, nnx.LoRAParam))
    q_grads = nnx.as_pure(nnx.grad(lambda m: lm_loss(m(tokens), tokens),
                                   argnums=nnx.DiffState(0, nnx.LoRAParam))(lm))
    own_grads = jax.grad(own_loss)(trainable)
    diffs = {"grad": 0.0, "update": 0.0}
    g_nodes = flat_nodes(own_grads)
    qg = by_path(q_grads)
    assert len(g_nodes) == 2 * 6 and len(qg) == 2 * len(g_nodes)
    for p, n in g_nodes.items():
        diffs["grad"] = max(diffs["grad"], _rel(qg[p + "_lora_a"], n.a), _rel(qg[p + "_lora_b"], n.b))

    # the optimizers get the same gradients (Qwix's), so only their algebra is compared
    same = lambda p, n: dataclasses.replace(n, a=qg[path_str(p) + "_lora_a"], b=qg[path_str(p) + "_lora_b"]) \
        if is_lora(n) else n
    own_grads = jax.tree_util.tree_map_with_path(same, own_grads, is_leaf=is_lora)
    paired, own = lora_jax.paired(make_tx(), scale=SCALE), make_tx()
    p_state, o_state = paired.init(q_params), own.init(trainable)
    for _ in range(2):
        q_u, p_state = jax.jit(paired.update)(q_grads, p_state, q_params)
        o_u, o_state = jax.jit(own.update)(own_grads, o_state, trainable)
        qu = by_path(q_u)
        for p, n in flat_nodes(o_u).items():
            diffs["update"] = max(diffs["update"], _rel(qu[p + "_lora_a"], n.a), _rel(qu[p + "_lora_b"], n.b))
        q_params, trainable = optax.apply_updates(q_params, q_u), optax.apply_updates(trainable, o_u)
    return diffs


TXS = {
    "lora_pro": lambda dt: lora_jax.lora_pro(compute_dtype=dt),
    "lora_pro_adamw": lambda dt: lora_jax.lora_pro_adamw(1e-2, weight_decay=0.1, compute_dtype=dt),
}


@pytest.mark.parametrize("name", list(TXS))
def test_a_qwix_pairs_equal_own_nodes_float32(name):
    d = qwix_and_own_updates(jnp.float32, lambda: TXS[name](jnp.float32))
    print(f"(a) Qwix float32 {name}: max rel diff grads {d['grad']:.2e}, updates {d['update']:.2e}")
    assert d["grad"] <= 1e-5 and d["update"] <= 1e-5


@pytest.mark.parametrize("name", list(TXS))
def test_a_qwix_pairs_equal_own_nodes_float64(name):
    with jax.enable_x64(True):
        d = qwix_and_own_updates(jnp.float64, lambda: TXS[name](jnp.float64))
    print(f"(a) Qwix float64 {name}: max rel diff grads {d['grad']:.2e}, updates {d['update']:.2e}")
    assert d["grad"] <= 1e-10 and d["update"] <= 1e-10


def test_d_merged_qwix_weights_give_the_same_logits():
    base, lm, tokens = qwix_model(seed=3)
    merged = lora_jax.merge_pairs(nnx.state(lm), scale=SCALE)
    plain = TinyLM(rngs=nnx.Rngs(99))  # other weights: every one must come from `merged`
    nnx.update(plain, merged)
    assert not nnx.state(plain, nnx.LoRAParam)
    want, got = lm(tokens), plain(tokens)
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    print(f"(d) merged Qwix logits: max abs diff {float(jnp.abs(got - want).max()):.2e}, relative to max |logit| {err:.1e}")
    # relative to the logits' scale (up to ~17 here): float32 rounding of x@(w + s·a@b) against
    # x@w + s·(x@a)@b, which an elementwise rtol misreads on logits near 0 (2e-5 at 0.1 on AMD EPYC)
    assert err < 1e-5
    assert float(jnp.abs(base(tokens) - want).max()) > 1e-2  # the adapters really change the model


# ------------------------------------------------------------------------------------------------
# (c) Flax NNX's own LoRALinear through nnx.Optimizer(wrt=nnx.LoRAParam)
# ------------------------------------------------------------------------------------------------

class LoRAMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.LoRALinear(12, 24, lora_rank=3, rngs=rngs)
        self.down = nnx.LoRALinear(24, 5, lora_rank=3, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def test_c_nnx_lora_linear_through_nnx_optimizer():
    model = LoRAMLP(nnx.Rngs(0))
    x, y = jax.random.normal(jax.random.key(1), (16, 12)), jax.random.normal(jax.random.key(2), (16, 5))
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    kernels = [np.asarray(l.kernel[...]) for l in (model.up, model.down)]

    opt = nnx.Optimizer(model, lora_jax.paired(lora_jax.lora_pro_adamw(1e-2)), wrt=nnx.LoRAParam)
    # the oracle: lora_jax.lora_pro_adamw on own nodes (w = None), same factors and gradients
    tx = lora_jax.lora_pro_adamw(1e-2)

    def own(m):
        return {n: LoRA(w=None, a=getattr(m, n).lora.lora_a[...], b=getattr(m, n).lora.lora_b[...],
                        scale=1.0, roles="io") for n in ("up", "down")}

    o_params = own(model)
    o_state = tx.init(o_params)
    losses = []
    for _ in range(5):
        losses.append(float(loss(model)))
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        g = nnx.as_pure(grads)
        o_grads = {n: LoRA(w=None, a=g[n]["lora"]["lora_a"], b=g[n]["lora"]["lora_b"], scale=1.0, roles="io")
                   for n in ("up", "down")}
        o_u, o_state = tx.update(o_grads, o_state, o_params)
        o_params = optax.apply_updates(o_params, o_u)
        opt.update(model, grads)
        for n in ("up", "down"):
            assert _rel(getattr(model, n).lora.lora_a[...], o_params[n].a) <= 1e-5
            assert _rel(getattr(model, n).lora.lora_b[...], o_params[n].b) <= 1e-5
    print(f"(c) nnx.LoRALinear + paired(lora_pro_adamw): loss {losses[0]:.4f} -> {float(loss(model)):.4f}")
    assert float(loss(model)) < losses[0]
    for l, k in zip((model.up, model.down), kernels):  # the base stays frozen
        np.testing.assert_array_equal(l.kernel[...], k)


# ------------------------------------------------------------------------------------------------
# (b) Tunix's PeftTrainer on one of Tunix's own models
# ------------------------------------------------------------------------------------------------

def projection_from_factor_grads(a, b, ga, gb, s):
    """P(G) for any full gradient G with ga = s·G bᵀ, gb = s·aᵀ G (matrix form, float64):
    P(G) = P_a G + G P_b − P_a G P_b, each term written with ga, gb only."""
    ata_inv, bbt_inv = np.linalg.inv(a.T @ a), np.linalg.inv(b @ b.T)
    pa_g = a @ ata_inv @ gb / s
    g_pb = ga @ bbt_inv @ b / s
    pa_g_pb = a @ ata_inv @ (gb @ b.T / s) @ bbt_inv @ b
    return pa_g + g_pb - pa_g_pb


def test_b_tunix_peft_trainer_with_lora_pro():
    tunix_sft = pytest.importorskip("tunix.sft.peft_trainer")
    from tunix.models.dummy_model_creator import create_dummy_model
    from tunix.models.qwen3 import model as qwen3
    from tunix.sft import utils as sft_utils
    from lora_jax import gram

    cfg = qwen3.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=64, num_heads=2,
                            head_dim=16, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6)
    base = create_dummy_model(qwen3.Qwen3, cfg, scale=0.2)  # random weights (Qwen3() zeroes its MLP)
    provider = qwix.LoraProvider(module_path=r".*q_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj",
                                 rank=RANK, alpha=ALPHA)
    model = qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(1), **base.get_model_input())

    # the two-line change to a Tunix script: the optimizer
    optimizer = lora_jax.paired(optax.chain(lora_jax.lora_pro(), optax.adamw(3e-3)), scale=ALPHA / RANK)
    config = tunix_sft.TrainingConfig(eval_every_n_steps=1000, max_steps=12)

    def gen_model_input(x):
        mask = x.input_mask
        return {"input_tokens": x.input_tokens, "input_mask": mask,
                "positions": sft_utils.build_positions_from_mask(mask),
                "attention_mask": sft_utils.make_causal_attn_mask(mask)}

    tokens = jax.random.randint(jax.random.key(5), (4, 16), 0, cfg.vocab_size)
    batch = tunix_sft.TrainingInput(input_tokens=tokens, input_mask=jnp.ones_like(tokens, bool))
    loss_of = lambda m: tunix_sft._default_loss_fn(m, **gen_model_input(batch))
    before = float(loss_of(model))
    trainer = tunix_sft.PeftTrainer(model, optimizer, config).with_gen_model_input_fn(gen_model_input)
    trainer.train([batch] * 12)
    after = float(loss_of(model))
    print(f"(b) Tunix PeftTrainer, Qwen3 tiny, paired(chain(lora_pro, adamw)): loss {before:.4f} -> {after:.4f}"
          f" in {trainer.train_steps} steps")
    assert trainer.train_steps == 12 and after < before - 0.05

    # LoRA-Pro's projection property, float64, on this model's trained factors and fresh gradients
    grads = nnx.as_pure(nnx.grad(loss_of, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))
    params = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), t)
        p64, g64 = to64(params), to64(grads)
        tx = lora_jax.paired(lora_jax.lora_pro(damping=0.0, compute_dtype=jnp.float64), scale=SCALE)
        u = tx.update(g64, tx.init(p64), p64)[0]
        P, G, U = by_path(p64), by_path(g64), by_path(u)
        a_paths = [k for k in P if k.endswith("_lora_a")]

        def matrices(t, path):  # the pair at `path` of tree `t` as (I, r), (r, O) float64 matrices
            roles = "i" * (P[path].ndim - 1)
            return (np.asarray(m) for m in gram.node_matrices(t[path], t[path[:-1] + "b"], roles))

        worst = 0.0
        for path in a_paths:
            (a, b), (ga, gb), (ua, ub) = (matrices(t, path) for t in (P, G, U))
            dK = SCALE * (ua @ b + a @ ub)
            worst = max(worst, _rel(dK, projection_from_factor_grads(a, b, ga, gb, SCALE)))
    print(f"(b) projection property on {len(a_paths)} pairs: max rel err {worst:.2e}")
    assert worst <= 1e-9


# ------------------------------------------------------------------------------------------------
# Keras 3 (JAX backend): real `enable_lora` layers driven by `stateless_call` + optax
# ------------------------------------------------------------------------------------------------

KERAS_SCRIPT = r'''
import os
os.environ["KERAS_BACKEND"] = "jax"
import jax, jax.numpy as jnp, numpy as np, optax, keras
import lora_jax
from lora_jax.node import LoRA

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(24, activation="gelu", name="up"),
                          keras.layers.Dense(5, name="down")])
for layer in model.layers:
    layer.enable_lora(3, lora_alpha=6.0)          # scale lora_alpha / rank = 2
paths = [v.path for v in model.trainable_variables]
params = {v.path: v.value for v in model.trainable_variables}
frozen = [v.value for v in model.non_trainable_variables]
rng = np.random.default_rng(0)
params = {p: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype) if "lora_kernel_b" in p else x
          for p, x in params.items()}             # b = 0 after enable_lora hides half the maths
x, y = rng.normal(size=(16, 12)).astype("float32"), rng.normal(size=(16, 5)).astype("float32")

def loss(params):
    out, _ = model.stateless_call([params[p] for p in paths], frozen, x)
    return jnp.mean((out - y) ** 2)

tx = lora_jax.paired(lora_jax.lora_pro_adamw(1e-2), a="lora_kernel_a", b="lora_kernel_b", scale=2.0)
own_tx = lora_jax.lora_pro_adamw(1e-2)
def own(t):                                        # the oracle: lora_jax's own nodes, same factors
    return {p[: -len("lora_kernel_a")]: LoRA(w=None, a=t[p], b=t[p[:-1] + "b"], scale=2.0, roles="io")
            for p in t if p.endswith("lora_kernel_a")} | {p: t[p] for p in t if "lora" not in p}
st, own_st, own_p = tx.init(params), own_tx.init(own(params)), own(params)
losses, worst = [float(loss(params))], 0.0
for _ in range(5):
    g = jax.grad(loss)(params)
    u, st = jax.jit(tx.update)(g, st, params)
    ou, own_st = jax.jit(own_tx.update)(own(g), own_st, own_p)
    ref = own(u)
    for k in ref:
        for got, want in zip(jax.tree.leaves(ref[k]), jax.tree.leaves(ou[k])):
            worst = max(worst, float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)))
    params, own_p = optax.apply_updates(params, u), optax.apply_updates(own_p, ou)
    losses.append(float(loss(params)))
for v in model.trainable_variables:
    v.assign(params[v.path])
print("RESULT", losses[0], losses[-1], float(jnp.mean((model(x) - y) ** 2)), worst)
'''


def test_keras_enable_lora_through_stateless_call():
    import subprocess
    import sys
    pytest.importorskip("keras")
    out = subprocess.run([sys.executable, "-c", KERAS_SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    first, last, assigned, worst = map(float, out.stdout.split("RESULT")[1].split())
    print(f"Keras enable_lora + paired(lora_pro_adamw): loss {first:.4f} -> {last:.4f}; vs own nodes {worst:.1e}")
    assert last < first and abs(assigned - last) < 1e-5 and worst <= 1e-5
