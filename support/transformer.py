"""The benchmark model: a Flax Linen transformer encoder.

4 layers, d_model 512, FFN 2048, 8 heads, batch 8×128 tokens; LoRA (rank 8) on q, k, v, o and both
FFN kernels, which is exactly what `lora_jax.apply`'s default targets pick here. Attention is Flax's
`nn.MultiHeadDotProductAttention` (DenseGeneral kernels) or, with ``attention="dense"``, plain
`nn.Dense` q/k/v/o named query/key/value/out. `adapt` gives `apply` the layout `layout_of` reads.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 4
    d_model: int = 512
    d_ff: int = 2048
    heads: int = 8
    batch: int = 8
    seq: int = 128
    scan: bool = False
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "mha"  # "mha": nn.MultiHeadDotProductAttention; "dense": plain nn.Dense q/k/v/o


class DenseAttention(nn.Module):
    """Self-attention with plain (d_model, d_model) Dense projections, as many ports have."""
    cfg: Config

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        split = lambda h: h.reshape(h.shape[:-1] + (cfg.heads, cfg.d_model // cfg.heads))
        q, k, v = (split(nn.Dense(cfg.d_model, dtype=cfg.dtype, name=n)(x))
                   for n in ("query", "key", "value"))
        h = nn.dot_product_attention(q, k, v, dtype=cfg.dtype)
        return nn.Dense(cfg.d_model, dtype=cfg.dtype, name="out")(h.reshape(x.shape))


class Block(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x, _=None):
        cfg = self.cfg
        h = nn.LayerNorm(dtype=cfg.dtype)(x)
        if cfg.attention == "dense":
            h = DenseAttention(cfg, name="attn")(h)
        else:
            h = nn.MultiHeadDotProductAttention(num_heads=cfg.heads, dtype=cfg.dtype, name="attn")(h, h)
        x = x + h
        h = nn.LayerNorm(dtype=cfg.dtype)(x)
        h = nn.Dense(cfg.d_ff, dtype=cfg.dtype, name="ffn_in")(h)
        h = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="ffn_out")(nn.gelu(h))
        return x + h, None


class Encoder(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        block = nn.remat(Block) if cfg.remat else Block
        if cfg.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=cfg.layers)
            x, _ = stack(cfg, name="layers")(x, None)
        else:
            for i in range(cfg.layers):
                x, _ = block(cfg, name=f"layer_{i}")(x)
        return nn.LayerNorm(dtype=cfg.dtype)(x)


def init(cfg: Config, seed: int = 0):
    """(model, params, x, y): random data of the benchmark's shape and a regression target."""
    model = Encoder(cfg)
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (cfg.batch, cfg.seq, cfg.d_model), cfg.dtype)
    y = jax.random.normal(ky, (cfg.batch, cfg.seq, cfg.d_model), cfg.dtype)
    params = model.init(kp, x)["params"]
    return model, params, x, y


def loss_fn(model):
    def loss(params, x, y):
        out = model.apply({"params": params}, x)
        return jnp.mean((out.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
    return loss


def adapt(model, params, x, **kwargs):
    """``lora_jax.apply(params, layout=layout_of(model), **kwargs)``: the attention and the
    scan-stacked kernels have 3 or more axes, whose roles `apply` does not guess."""
    layout = lora_jax.layout_of(lambda p, x: model.apply({"params": p}, x), params, x)
    return lora_jax.apply(params, layout=layout, **kwargs)


def full_step(model):
    """Full fine-tuning: value and gradient with respect to every parameter."""
    return jax.value_and_grad(loss_fn(model))


def lora_step(model):
    """LoRA: value and gradient with respect to the trainable half only (frozen is a constant)."""
    loss = lora_jax.wrap(loss_fn(model))

    def step(trainable, frozen, x, y):
        return jax.value_and_grad(lambda t: loss(lora_jax.combine(t, frozen), x, y))(trainable)
    return step
