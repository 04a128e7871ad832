"""A Llama-architecture decoder in Flax Linen that loads GGUF and HF safetensors checkpoints.

* `LlamaConfig`: the fields of a HF Llama ``config.json`` (or the GGUF ``llama.*`` metadata).
* `Llama`: token embedding, N pre-norm layers (RMSNorm, grouped-query self-attention with RoPE,
  RMSNorm, SwiGLU MLP), a final RMSNorm and the LM head (tied to the embedding or not), as HF's
  ``LlamaForCausalLM``. RoPE uses HF's ``rotate_half`` convention (the two halves of each head's
  dimensions rotate together) and the checkpoint's base; it is computed in float32, as are the
  norms, attention scores and softmax.
* `load_gguf(path)` / `load_hf(dir)` / `load(path)` → ``(config, params)``; `load_tokenizer(path)`.
* `generate(...)`: jitted greedy or temperature/top-p decoding with a KV cache of static length
  (``lax.while_loop``, stopping when every row has produced eos), for plain params or params with
  LoRA nodes (run factored through `lora_jax.wrap`).

Every projection is a plain 2-D ``nn.Dense`` (kernel (in, out), no bias) with HF's name, so LoRA
targets are one regex::

    adapted = lora_jax.apply(params, rank=8, targets=LORA_TARGETS,
                             layout=lora_jax.layout_of(forward, params, ids))

Parameter tree (layer i)::

    embed_tokens/embedding                                       (vocab, hidden)
    layers_i/input_layernorm/scale, layers_i/post_attention_layernorm/scale
    layers_i/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel      (in, out)
    layers_i/mlp/{gate_proj,up_proj,down_proj}/kernel            (in, out)
    norm/scale
    lm_head/kernel                                               (hidden, vocab), untied only

Params are a plain tree of arrays and the module only multiplies by them: dequantization is the
loader's business (`dequantize_gguf_tensor`), or, with ``load_gguf(..., keep_quantized=True)``
(QLoRA), `lora_jax.Quantized` leaves stand in for the kernels and the embedding and are
dequantized where `lora_jax.wrap` runs their products. `lora_jax.layout_of` needs arrays: give it
``jax.ShapeDtypeStruct(q.shape, q.dtype)`` in place of each quantized leaf.

GGUF and RoPE: llama.cpp's converter permutes the rows (output features) of ``attn_q`` and
``attn_k`` within each head, from HF's half-split layout to interleaved pairs, because ggml's RoPE
rotates adjacent pairs. `unpermute_qk_rows` undoes it (as transformers' GGUF loader does); it
moves whole rows, so it applies equally to quantized rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf.quants import dequantize

import lora_jax
from .bert import load_state_dict
from .gguf_blocks import from_gguf_blocks
from .gguf_tokenizer import LlamaTokenizer, gguf_metadata

LORA_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


# --------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """From a HF ``config.json`` dict; refuses what this module does not implement."""
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "mistral"):
            raise NotImplementedError(f"model_type {mt!r}: only Llama-architecture checkpoints load")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise NotImplementedError(f"{flag}=True: biases are not implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d['hidden_act']!r}: only silu (SwiGLU)")
        scaling = d.get("rope_scaling") or (d.get("rope_parameters") or {})
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if kind != "default":
            raise NotImplementedError(f"rope scaling {kind!r} is not implemented")
        theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        if d.get("sliding_window"):
            raise NotImplementedError("sliding-window attention is not implemented")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None and k != "rope_theta"}
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(k), list):  # several eos ids: the first is the one we stop on
                kwargs[k] = kwargs[k][0]
        return cls(rope_theta=float(theta), **kwargs)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tie_word_embeddings: bool) -> "LlamaConfig":
        """From GGUF metadata (``llama.*`` keys, as transformers maps them)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise NotImplementedError(f"GGUF architecture {arch!r}: only 'llama' loads")
        g = lambda k, default=None: meta.get(f"llama.{k}", default)
        if g("rope.scaling.type") not in (None, "none"):
            raise NotImplementedError(f"rope scaling {g('rope.scaling.type')!r} is not implemented")
        heads = int(g("attention.head_count"))
        hidden = int(g("embedding_length"))
        vocab = g("vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(g("feed_forward_length")),
            num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
            num_key_value_heads=int(g("attention.head_count_kv", heads)),
            head_dim=int(g("rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(g("rope.freq_base", 10000.0)),
            max_position_embeddings=int(g("context_length", 2048)),
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


# --------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """HF ``LlamaRMSNorm``: normalise in float32, cast back, then scale (in that order, as HF)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_tables(positions, head_dim: int, theta: float):
    """``(cos, sin)`` of shape (*positions.shape, head_dim) in float32, HF's layout: the
    frequencies ``theta ** (-2j / head_dim)`` for j < head_dim/2, repeated for both halves."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate (B, T, heads, head_dim) `x` by (B, T, head_dim) tables: ``x·cos + rotate_half(x)·sin``
    with ``rotate_half(x) = [-x₂, x₁]`` (HF's convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def grouped_attention(q, k, v, mask):
    """Softmax attention with grouped K/V: `q` (B, T, heads, d), `k`, `v` (B, S, kv_heads, d),
    `mask` (B, T, S) bool (True: may attend). Query head h reads K/V head h // (heads / kv_heads),
    as HF's ``repeat_kv``. Scores and softmax in float32; returns (B, T, heads, d)."""
    B, T, H, D = q.shape
    G = k.shape[2]
    q = q.reshape(B, T, G, H // G, D)
    scores = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(B, T, H, D)


def _dense(cfg: LlamaConfig, features: int, name: str, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range))


class Attention(nn.Module):
    """GQA self-attention with RoPE. With a `cache` ``(k, v)`` of (B, S_max, kv_heads, d), the new
    keys/values are written at slot `index` and attention runs over the whole cache (masked)."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cos, sin, mask, cache=None, index=None):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        B, T, _ = h.shape
        nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(cfg, nh * hd, "q_proj", dt, pdt)(h).reshape(B, T, nh, hd)
        k = _dense(cfg, kvh * hd, "k_proj", dt, pdt)(h).reshape(B, T, kvh, hd)
        v = _dense(cfg, kvh * hd, "v_proj", dt, pdt)(h).reshape(B, T, kvh, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            cache = (k, v)
        ctx = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        out = _dense(cfg, cfg.hidden_size, "o_proj", dt, pdt)(ctx.reshape(B, T, nh * hd))
        return out, cache


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        g = _dense(cfg, cfg.intermediate_size, "gate_proj", dt, pdt)(x)
        u = _dense(cfg, cfg.intermediate_size, "up_proj", dt, pdt)(x)
        return _dense(cfg, cfg.hidden_size, "down_proj", dt, pdt)(nn.silu(g) * u)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cos, sin, mask, cache=None, index=None):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        a, cache = Attention(cfg, dt, pdt, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(h), cos, sin, mask, cache, index)
        h = h + a
        h = h + MLP(cfg, dt, pdt, name="mlp")(RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(h))
        return h, cache


class Llama(nn.Module):
    """HF ``LlamaForCausalLM``: ``(B, T)`` token ids → float32 logits (B, T, vocab).

    Without a cache: causal self-attention over the T tokens, where `attention_mask` (B, T; 1 real,
    0 padding) also hides padded keys; `positions` default to 0..T-1 (HF's default).

    With ``cache`` (a tuple of per-layer ``(k, v)``, each (B, S_max, kv_heads, head_dim), from
    `init_cache`) and ``index`` (int scalar: the slot of the first of the T tokens), the tokens'
    keys/values are written at slots index..index+T-1 and each token attends to the slots ≤ its
    own where `attention_mask` (then (B, S_max), over slots) is 1. Returns ``(logits, cache)``.

    ``last_only=True`` computes logits for the last position only (B, 1, vocab).
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, index=None,
                 last_only: bool = False):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        input_ids = jnp.asarray(input_ids)
        B, T = input_ids.shape
        if positions is None:
            start = 0 if index is None else index
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = self._mask(B, T, attention_mask, cache, index)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", dtype=dt,
                         param_dtype=pdt, embedding_init=nn.initializers.normal(cfg.initializer_range))
        h = embed(input_ids)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        new_cache = []
        for i in range(cfg.num_hidden_layers):
            h, c = DecoderLayer(cfg, dt, pdt, name=f"layers_{i}")(
                h, cos, sin, mask, None if cache is None else cache[i], index)
            new_cache.append(c)
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="norm")(h)
        if last_only:
            h = h[:, -1:]
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = _dense(cfg, cfg.vocab_size, "lm_head", dt, pdt)(h)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, tuple(new_cache))

    @staticmethod
    def _mask(B, T, attention_mask, cache, index):
        """(B, T, S) bool: causal, and padded keys hidden."""
        if cache is None:
            q_pos = k_pos = jnp.arange(T)
            keys = jnp.ones((B, T), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        else:
            S = cache[0][0].shape[1]
            q_pos, k_pos = index + jnp.arange(T), jnp.arange(S)
            keys = jnp.ones((B, S), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        causal = k_pos[None, :] <= q_pos[:, None]
        return causal[None] & keys[:, None, :]


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32):
    """An empty KV cache: per layer ``(k, v)`` zeros of (batch, max_len, kv_heads, head_dim)."""
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))


def init_params(config: LlamaConfig, key, dtype=jnp.float32) -> dict:
    """Random params (normal(initializer_range) kernels, unit norms), without the ``params`` wrapper."""
    model = Llama(config, param_dtype=dtype)
    return model.init(key, jnp.zeros((1, 2), jnp.int32))["params"]


# --------------------------------------------------------------------------------------------
# generation


def _has_lora(params) -> bool:
    """Params that need `lora_jax.wrap`: LoRA nodes or quantized weights."""
    special = lambda x: lora_jax.is_lora(x) or lora_jax.is_quantized(x)
    return any(special(x) for x in jax.tree_util.tree_leaves(params, is_leaf=special))


def sample_token(logits, key, temperature: float, top_p: float):
    """Next ids from (B, V) float32 logits: argmax when ``temperature == 0``; else sampled from
    softmax(logits / temperature) restricted to the smallest set of most likely tokens whose
    probability reaches `top_p` (nucleus; the most likely token is always kept)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p", "factored"))
def _generate(model, params, prompt, prompt_mask, key, eos_id, pad_id, adapter_ids, *, max_new_tokens: int,
              temperature: float, top_p: float, factored: bool):

    B, T = prompt.shape
    S = T + max_new_tokens
    call = model.apply
    if factored:
        call = functools.partial(lora_jax.wrap(call), lora_adapter_ids=adapter_ids)
    cache = init_cache(model.config, B, S, model.dtype)
    slot_mask = jnp.concatenate([prompt_mask, jnp.ones((B, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = call({"params": params}, prompt, slot_mask, positions, cache, 0, last_only=True)
    next_pos = positions[:, -1] + 1

    def cond(state):
        i, _, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, cache, done, logits, pos, key = state
        key, sub = jax.random.split(key)
        tok = sample_token(logits[:, -1], sub, temperature, top_p)
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        done = done | (tok == eos_id)
        logits, cache = call({"params": params}, tok[:, None], slot_mask, pos[:, None], cache, T + i,
                             last_only=True)
        return i + 1, tokens, cache, done, logits, pos + 1, key

    tokens = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), tokens, cache, jnp.zeros((B,), bool), logits, next_pos, key)
    return jax.lax.while_loop(cond, body, state)[1]


def generate(model: Llama, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, key=None, eos_id: int | None = None,
             pad_id: int | None = None, width: int | None = None, adapter_ids=None) -> np.ndarray:
    """New tokens (B, max_new_tokens) for token-id `prompts` (lists, any lengths: left-padded here).

    Greedy for ``temperature=0``, else temperature/top-p sampling with `key`. A row stops at
    `eos_id` (default: the config's; the eos is kept, later slots hold `pad_id`); the loop ends
    when every row has stopped. `params` may hold LoRA nodes: they run factored (`lora_jax.wrap`).
    Positions of left-padded rows count from their first real token, as HF's ``generate``.
    Compiled once per (model, batch, prompt width, max_new_tokens, temperature, top_p): the prompts
    are left-padded to ``width`` (default: the longest), so a caller decoding many batches gives
    one ``width`` (and as many prompts per call) to compile once. Left padding changes no
    logits: padded slots are masked and positions count from each row's first real token.

    With `params` holding several adapters (`lora_jax.stack`), ``adapter_ids`` (one per prompt,
    −1: the base model) picks each prompt's adapter: one batch answered by several fine-tunes at
    once, one KV cache of the usual layout. Changing the ids or the adapters' values (same
    shapes, `lora_jax.put_adapter`) reuses the compiled loop.
    """
    cfg = model.config
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    eos_id = -1 if eos_id is None else eos_id
    pad_id = (cfg.pad_token_id if cfg.pad_token_id is not None else max(eos_id, 0)) if pad_id is None else pad_id
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature} must be ≥ 0 and top_p {top_p} in (0, 1]")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    T = max(len(p) for p in prompts)
    if T == 0:
        raise ValueError("empty prompt")
    if width is not None:
        if width < T:
            raise ValueError(f"width {width} is shorter than the longest prompt ({T} tokens)")
        T = int(width)
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, T - len(p):], mask[r, T - len(p):] = p, 1
    key = jax.random.key(0) if key is None else key
    if adapter_ids is not None:
        adapter_ids = np.asarray(adapter_ids)
        if adapter_ids.shape != (len(prompts),):
            raise ValueError(f"adapter_ids has shape {adapter_ids.shape}; give one adapter index per "
                             f"prompt ({len(prompts)})")
        k = lora_jax.num_adapters(params)
        if adapter_ids.size and (adapter_ids.min() < -1 or adapter_ids.max() >= k):
            raise ValueError(f"adapter_ids must lie in [-1, {k - 1}] ({k} stacked adapters)")
        adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
    out = _generate(model, params, jnp.asarray(ids), jnp.asarray(mask), key, jnp.int32(eos_id),
                    jnp.int32(pad_id), adapter_ids, max_new_tokens=int(max_new_tokens),
                    temperature=float(temperature), top_p=float(top_p), factored=_has_lora(params))
    return np.asarray(out)


# --------------------------------------------------------------------------------------------
# GGUF


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of an ``attn_q``/``attn_k`` weight (rows = output
    features, `n_head` heads; kv heads for ``attn_k``): within each head, llama.cpp's converter put
    row pairs (j, j + d/2) next to each other; this puts them back in HF's half-split order."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` (``convert_hf_to_gguf.py``): HF rows → GGUF rows."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_gguf_tensor(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as float32 NumPy, in PyTorch's layout (rows = GGUF's last dim)."""
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)


# GGUF tensor name (per layer, after ``blk.{i}.``) → (path under layers_i, is a Linear weight)
_GGUF_LAYER = {
    "attn_norm.weight": (("input_layernorm", "scale"), False),
    "ffn_norm.weight": (("post_attention_layernorm", "scale"), False),
    "attn_q.weight": (("self_attn", "q_proj", "kernel"), True),
    "attn_k.weight": (("self_attn", "k_proj", "kernel"), True),
    "attn_v.weight": (("self_attn", "v_proj", "kernel"), True),
    "attn_output.weight": (("self_attn", "o_proj", "kernel"), True),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), True),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), True),
}
_GGUF_TOP = {
    "token_embd.weight": (("embed_tokens", "embedding"), False),
    "output_norm.weight": (("norm", "scale"), False),
    "output.weight": (("lm_head", "kernel"), True),
}


def gguf_key_map(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """GGUF tensor name → (path in the `Llama` param tree, transpose to (in, out)?)."""
    m = {k: v for k, v in _GGUF_TOP.items() if k != "output.weight" or not config.tie_word_embeddings}
    for i in range(config.num_hidden_layers):
        for k, (path, lin) in _GGUF_LAYER.items():
            m[f"blk.{i}.{k}"] = ((f"layers_{i}", *path), lin)
    return m


def load_gguf(path: str | Path, *, dtype=jnp.float32, keep_quantized: bool = False
              ) -> tuple[LlamaConfig, dict]:
    """``(config, params)`` from a llama.cpp GGUF file of architecture ``llama``.

    With ``keep_quantized=True`` (QLoRA), Q4_1 and Q8_0 tensors stay in their blocks as
    `lora_jax.Quantized` leaves (dequantizing to `dtype` where they are used; other types are
    dequantized as below): ``attn_q``/``attn_k`` rows are unpermuted as raw quantized rows, and a
    Linear weight's transpose to (in, out) is the `Quantized` layout flag, not a copy. Such params
    need `lora_jax.wrap` (which `generate` applies); `lora_jax.apply` adapts the quantized kernels.

    Every tensor is dequantized to float32 with `gguf.quants.dequantize` (F32/F16/BF16, Q8_0,
    Q4_0/1, K-quants, … whatever the ``gguf`` package reads), ``attn_q``/``attn_k`` rows are put
    back in HF's order (`unpermute_qk_rows`) and Linear weights transposed to (in, out); then cast
    to `dtype`. The embeddings are tied when the file has no ``output.weight``. Missing or
    unexpected tensors, or shapes that do not fit the metadata, raise `ValueError` listing them.
    """


    reader = gguf.GGUFReader(str(path))
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = LlamaConfig.from_gguf_metadata(meta, tie_word_embeddings="output.weight" not in tensors)
    keymap = gguf_key_map(config)
    missing = sorted(set(keymap) - set(tensors))
    unexpected = sorted(set(tensors) - set(keymap) - {"rope_freqs.weight"})
    if missing or unexpected:
        raise ValueError(f"{path}: GGUF tensors do not match a {config.num_hidden_layers}-layer Llama:\n"
                         f"  missing ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected ({len(unexpected)}): {unexpected[:20]}")
    if "rope_freqs.weight" in tensors:
        raise NotImplementedError(f"{path}: rope_freqs (Llama-3.1 RoPE scaling) is not implemented")
    state = {}
    for name, (tree_path, linear) in keymap.items():
        if keep_quantized and tensors[name].tensor_type.name in ("Q4_1", "Q8_0"):
            state[tree_path] = _quantized_gguf_tensor(tensors[name], name, config, linear, dtype)
            continue
        w = dequantize_gguf_tensor(tensors[name])
        if name.endswith("attn_q.weight"):
            w = unpermute_qk_rows(w, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk_rows(w, config.num_key_value_heads)
        state[tree_path] = w.T if linear else w
    return config, _to_tree(state, config, dtype, source=str(path))


def _quantized_gguf_tensor(tensor, name: str, config: LlamaConfig, linear: bool, dtype):
    """A Q4_1/Q8_0 GGUF tensor as `lora_jax.Quantized`: raw rows (uint8, whole blocks per row),
    Q/K rows unpermuted as they are, (out, in) → (in, out) as the layout flag."""
    raw = np.asarray(tensor.data)  # (rows, bytes per row)
    if name.endswith("attn_q.weight"):
        raw = unpermute_qk_rows(raw, config.num_attention_heads)
    elif name.endswith("attn_k.weight"):
        raw = unpermute_qk_rows(raw, config.num_key_value_heads)
    return from_gguf_blocks(raw, tensor.tensor_type.name, transposed=linear, dtype=dtype)


# --------------------------------------------------------------------------------------------
# HF safetensors

_HF_LAYER = {
    "input_layernorm.weight": (("input_layernorm", "scale"), False),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), False),
    **{f"self_attn.{n}.weight": (("self_attn", n, "kernel"), True) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"mlp.{n}.weight": (("mlp", n, "kernel"), True) for n in ("gate_proj", "up_proj", "down_proj")},
}


def hf_key_map(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF ``LlamaForCausalLM`` state-dict key → (path in the `Llama` param tree, transpose?)."""
    m = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
         "model.norm.weight": (("norm", "scale"), False)}
    if not config.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_hidden_layers):
        for k, (path, lin) in _HF_LAYER.items():
            m[f"model.layers.{i}.{k}"] = ((f"layers_{i}", *path), lin)
    return m


def load_hf(path: str | Path, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """``(config, params)`` from a HF Llama directory (``config.json`` + ``model.safetensors`` or
    shards), as ``save_pretrained`` writes it. Linear weights are transposed to (in, out); a
    ``lm_head.weight`` of a tied checkpoint and ``rotary_emb.inv_freq`` buffers are ignored; any
    other unknown or missing key raises `ValueError` listing them."""
    path = Path(path)
    cfg_dir = path if path.is_dir() else path.parent
    config = LlamaConfig.from_hf_dict(json.loads((cfg_dir / "config.json").read_text()))
    raw = load_state_dict(path)
    keymap = hf_key_map(config)
    ignored = {k for k in raw if k.endswith("rotary_emb.inv_freq")
               or (k == "lm_head.weight" and config.tie_word_embeddings)}
    missing = sorted(set(keymap) - set(raw))
    unexpected = sorted(set(raw) - set(keymap) - ignored)
    if missing or unexpected:
        raise ValueError(f"{path}: HF checkpoint does not match a {config.num_hidden_layers}-layer Llama:\n"
                         f"  missing ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected ({len(unexpected)}): {unexpected[:20]}")
    state = {p: (np.asarray(raw[k], np.float32).T if lin else np.asarray(raw[k], np.float32))
             for k, (p, lin) in keymap.items()}
    return config, _to_tree(state, config, dtype, source=str(path))


def _expected_shapes(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {("embed_tokens", "embedding"): (V, H), ("norm", "scale"): (H,), ("lm_head", "kernel"): (H, V),
            ("input_layernorm", "scale"): (H,), ("post_attention_layernorm", "scale"): (H,),
            ("self_attn", "q_proj", "kernel"): (H, q), ("self_attn", "k_proj", "kernel"): (H, kv),
            ("self_attn", "v_proj", "kernel"): (H, kv), ("self_attn", "o_proj", "kernel"): (q, H),
            ("mlp", "gate_proj", "kernel"): (H, F), ("mlp", "up_proj", "kernel"): (H, F),
            ("mlp", "down_proj", "kernel"): (F, H)}


def _to_tree(state: dict[tuple[str, ...], np.ndarray], config: LlamaConfig, dtype, source: str) -> dict:
    """Nest ``{path: array}`` into the param tree, checking every shape against the config."""
    shapes = _expected_shapes(config)
    bad = []
    params: dict = {}
    for path, x in state.items():
        want = shapes[path[1:] if path[0].startswith("layers_") else path]
        if tuple(x.shape) != want:
            bad.append(f"{'/'.join(path)}: {tuple(x.shape)}, config needs {want}")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = x.astype(dtype) if hasattr(x, "dequantize") else jnp.asarray(x, dtype)
    if bad:
        raise ValueError(f"{source}: shapes do not fit the config:\n  " + "\n  ".join(bad[:20]))
    return params


# --------------------------------------------------------------------------------------------
# either format


def load(path: str | Path, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """`load_gguf` for a ``.gguf`` file, else `load_hf` (a directory or ``.safetensors`` file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (a .gguf file or a HF model directory); "
                                "SmolLM2: train.assets.smollm2_gguf() fetches one")
    return load_gguf(path, dtype=dtype) if path.suffix == ".gguf" else load_hf(path, dtype=dtype)


def load_tokenizer(path: str | Path):
    """The checkpoint's `train.gguf_tokenizer.LlamaTokenizer` (GGUF metadata or ``tokenizer.json``)."""
    path = Path(path)
    return LlamaTokenizer.from_gguf(path) if path.suffix == ".gguf" else LlamaTokenizer.from_dir(
        path if path.is_dir() else path.parent)
