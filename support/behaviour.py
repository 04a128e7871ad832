"""The teacher–student task behind bench/lora_pro_behaviour.py, shared with
tests/test_lora_pro_behaviour.py.

Per seed: a frozen random 3-layer tanh MLP 64→128→128→32 (weights N(0, 1/fan_in), no biases) is
the "pre-trained" network W0. The teacher is W0 plus, in every layer, a random update of rank
2r = 16 with a geometrically decaying spectrum (σ_k = 0.8·0.85^k, random orthonormal singular
vectors; its best rank-8 approximation keeps ~93% of the energy), so full fine-tuning can reach ~0
loss and a rank-8 adapter cannot quite — "follow full FT" is then a well-posed target, unlike a
teacher whose update is exactly low-rank (where LoRA can beat full FT). The student starts at W0
and regresses the teacher's outputs (MSE, mean over samples and outputs) on N = 1024 fixed Gaussian
inputs, full batch. Every kernel is adapted: rank r = 8, alpha = 16 (s = alpha/r = 2, the paper's
Llama setting), init "lora" (PEFT's default: Kaiming-uniform a, b = 0) — so LoRA and LoRA-Pro start
exactly at W0, as does full FT. Seeds change W0, the teacher's update, the data and the adapter init.

`all_curves` trains every (learning rate, seed) pair of one method in one jit; `distance` is the
curve distance to full FT: mean over steps of |log10 L_method(t) − log10 L_full(t)|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax

DIMS = (64, 128, 128, 32)
N = 1024
TEACHER_RANK, SIGMA0, DECAY = 16, 0.8, 0.85
RANK, ALPHA, INIT = 8, 16.0, "lora"
STEPS = 250
SEEDS = (0, 1, 2)
SGD_LRS = (0.1, 0.3, 1.0, 3.0, 10.0)
ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)

MODES = {  # mode -> (lr grid, full-FT/LoRA optimizer, LoRA-Pro optimizer)
    "sgd": ("sgd", lambda lr: optax.chain(lora_jax.lora_pro(), optax.sgd(lr))),
    "adamw-efficient": ("adamw", lambda lr: optax.chain(lora_jax.lora_pro(),
                                                         optax.adamw(lr, weight_decay=0.0))),
    "adamw-full": ("adamw", lambda lr: lora_jax.lora_pro_adamw(lr)),
}
BASE_TX = {"sgd": lambda lr: optax.sgd(lr), "adamw": lambda lr: optax.adamw(lr, weight_decay=0.0)}


def forward(p, x):
    h = jnp.tanh(x @ p["l0"]["kernel"])
    h = jnp.tanh(h @ p["l1"]["kernel"])
    return h @ p["l2"]["kernel"]


def _orth(key, n, k):
    return jnp.linalg.qr(jax.random.normal(key, (n, k)))[0]


def problem(seed, dims=DIMS, n=N, teacher_rank=TEACHER_RANK, rank=RANK, alpha=ALPHA, init=INIT):
    """(w0, x, y, lora_trainable, lora_frozen) for one seed."""
    ks = jax.random.split(jax.random.key(seed), 3 * len(dims))
    w0, teacher = {}, {}
    sig = SIGMA0 * DECAY ** jnp.arange(teacher_rank)
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
        w = jax.random.normal(ks[3 * i], (din, dout)) / np.sqrt(din)
        u, v = _orth(ks[3 * i + 1], din, teacher_rank), _orth(ks[3 * i + 2], dout, teacher_rank)
        w0[f"l{i}"] = {"kernel": w}
        teacher[f"l{i}"] = {"kernel": w + (u * sig) @ v.T}
    x = jax.random.normal(ks[-1], (n, dims[0]))
    y = forward(teacher, x)
    adapted = lora_jax.apply(w0, rank=rank, alpha=alpha, init=init, key=jax.random.key(1000 + seed))
    t, frozen = lora_jax.split(adapted)
    return w0, x, y, t, frozen


forward_lora = lora_jax.wrap(forward)


def _train(loss, p0, tx, steps):
    def step(c, _):
        p, s = c
        l, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), l

    return jax.lax.scan(step, (p0, tx.init(p0)), None, length=steps)[1]


def run_full(make_tx, lr, w0, x, y, steps):
    return _train(lambda p: jnp.mean((forward(p, x) - y) ** 2), w0, make_tx(lr), steps)


def run_lora(make_tx, lr, t, frozen, x, y, steps):
    loss = lambda t: jnp.mean((forward_lora(lora_jax.combine(t, frozen), x) - y) ** 2)  # noqa: E731
    return _train(loss, t, make_tx(lr), steps)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def all_curves(kind, make_tx, lrs, data, steps):
    """Loss curves (len(lrs), len(seeds), steps): one jit, vmapped over seeds and learning rates."""
    w0, x, y, t, frozen = data
    if kind == "full":
        one = lambda lr, w0, x, y, t, fr: run_full(make_tx, lr, w0, x, y, steps)  # noqa: E731
    else:
        one = lambda lr, w0, x, y, t, fr: run_lora(make_tx, lr, t, fr, x, y, steps)  # noqa: E731
    over_seeds = jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0))
    f = jax.jit(jax.vmap(over_seeds, in_axes=(0, None, None, None, None, None)))
    out = np.asarray(f(jnp.asarray(lrs, jnp.float32), w0, x, y, t, frozen), np.float64)
    return np.where(np.isfinite(out), out, np.inf)


def make_data(seeds, **kw):
    return tuple(_stack(z) for z in zip(*(problem(s, **kw) for s in seeds)))


def distance(c, ref):
    """Mean over steps of |log10 c − log10 ref| along the last axis (inf if c diverged)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.mean(np.abs(np.log10(np.maximum(c, 1e-30)) - np.log10(np.maximum(ref, 1e-30))), -1)
    return np.where(np.isfinite(d), d, np.inf)
