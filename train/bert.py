"""A BERT-family encoder in Flax Linen that loads Hugging Face safetensors, and a classifier on it.

* `BertConfig`: the fields of a HF ``config.json`` this encoder needs (BERT and RoBERTa).
* `BertEncoder`: embeddings (word + position + token type, LayerNorm) and N post-LN layers of
  self-attention and FFN, as HF's ``BertModel``/``RobertaModel`` (absolute positions; RoBERTa's
  positions start at ``pad_token_id + 1`` and skip padding, as HF computes them).
* `Classifier`: encoder + pooling ("mean" as sentence-transformers' MiniLM, "cls", or "pooler":
  HF's tanh dense on the CLS token) + a fresh `head` Dense, trained fully beside the adapters.
* `load_hf_safetensors(dir) -> (config, params)`: HF key names (optionally under ``bert.`` /
  ``roberta.``; legacy LayerNorm ``gamma``/``beta``) mapped onto the Linen tree, Linear weights
  transposed to (in, out); missing or unexpected keys raise, listing them.
* `init_classifier(config, num_classes, key, encoder_params)`: loaded encoder + fresh head.
* `attention(q, k, v, mask)`: `jax.nn.dot_product_attention` with the padding mask, cuDNN's
  fused kernel on GPU (bf16/fp16) and XLA's elsewhere; training calls with attention
  dropout take `attention_with_dropout` (materialised probabilities) instead.

Every projection is a plain 2-D ``nn.Dense`` named ``query``, ``key``, ``value``,
``attention_output``, ``intermediate`` or ``output``, so LoRA targets are one regex, e.g.::

    LORA_TARGETS = r"(query|key|value|attention_output|intermediate|output)/kernel"
    adapted = lora_jax.apply(variables, rank=8, targets=LORA_TARGETS)
    trainable, frozen = lora_jax.split(adapted, trainable="head")

Parameter tree of `BertEncoder` (layer i)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    layer_i/{query,key,value,attention_output,intermediate,output}/{kernel,bias}
    layer_i/{attention_LayerNorm,output_LayerNorm}/{scale,bias}
    pooler/{kernel,bias}                    (only with ``with_pooler=True``)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

LORA_TARGETS = r"(query|key|value|attention_output|intermediate|output)/kernel"
POOLINGS = ("mean", "cls", "pooler")

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


# --------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    model_type: str = "bert"
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; one of "
                             f"{sorted(_ACTIVATIONS)}")
        if self.position_embedding_type != "absolute":
            raise NotImplementedError(f"position_embedding_type {self.position_embedding_type!r}: "
                                      "only 'absolute' is implemented")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from ``padding_idx + 1``; BERT from 0."""
        return self.pad_token_id + 1 if self.model_type in ("roberta", "xlm-roberta", "camembert") else 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------
# attention

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def attention_implementation(dtype, head_dim: int, seq_len: int) -> str:
    """The kernel ``implementation=None`` resolves to: ``"cudnn"`` (cuDNN's fused flash
    attention) on a GPU backend for bf16/fp16 inputs, a head dim that is a multiple of 8 and at
    most 128, and an even sequence length (cuDNN's conditions for a masked training step), else
    ``"xla"``. JAX's own ``implementation=None`` always means XLA (jax ≤ 0.11), hence this choice.
    On GPU, `attention` still falls back to XLA if cuDNN then refuses the call."""
    fits = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128 and seq_len % 2 == 0)
    return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


@functools.partial(jax.jit, static_argnames="implementation")
def _fused_attention(q, k, v, mask, implementation: str):
    """`jax.nn.dot_product_attention` under its own `jax.jit`. cuDNN's kernel is a
    `jax.custom_vjp`, which quax (under `lora_jax.wrap`) cannot trace directly; as a nested
    jitted call it is staged to a jaxpr first and quax passes it through untouched."""
    B, T = q.shape[:2]
    if implementation == "cudnn":  # cuDNN takes a mask as a (B, 1, T, S) bias only
        mask = jnp.broadcast_to(mask[:, None, None, :], (B, 1, T, mask.shape[-1]))
    else:
        mask = mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def attention(q, k, v, mask, *, implementation: str | None = None):
    """Softmax attention of (B, T, heads, head_dim) `q`, `k`, `v` (the layout
    `jax.nn.dot_product_attention` takes) over the keys where the (B, S) bool `mask` is True;
    returns (B, T, heads, head_dim). Logits and softmax are computed in float32.

    `implementation`: None picks per `attention_implementation` (cuDNN on GPU where it applies,
    XLA elsewhere, falling back to XLA with a warning if cuDNN fails at trace time); "xla" or
    "cudnn" force one (a forced "cudnn" raises where cuDNN cannot run).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    if implementation is not None:
        return _fused_attention(q, k, v, mask, implementation)
    chosen = attention_implementation(q.dtype, q.shape[-1], q.shape[1])
    if chosen == "cudnn":
        try:
            return _fused_attention(q, k, v, mask, "cudnn")
        except Exception as e:  # cuDNN's shape/version/device checks; XLA's result is the same
            warnings.warn(f"cuDNN attention unavailable ({type(e).__name__}: {e}); using XLA's",
                          stacklevel=2)
    return _fused_attention(q, k, v, mask, "xla")


def attention_with_dropout(q, k, v, mask, dropout: nn.Dropout, deterministic: bool):
    """`attention`'s maths with dropout on the attention probabilities (HF's
    ``attention_probs_dropout_prob``), which `jax.nn.dot_product_attention` cannot apply: the
    scores and probabilities are materialised as (B, heads, T, S). Used only when attention
    dropout is active in a training call."""
    wide = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=wide)
    scores = scores / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(wide).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


# --------------------------------------------------------------------------------------------
# modules


def _dense(cfg: BertConfig, features: int, name: str, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(features, name=name, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range))


def _layer_norm(cfg: BertConfig, name: str, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, dtype=dtype, param_dtype=param_dtype)


def position_ids_for(config: BertConfig, input_ids):
    """HF's default position ids: ``arange`` for BERT; RoBERTa's skip padding tokens and start
    at ``pad_token_id + 1`` (``create_position_ids_from_input_ids``)."""
    if config.position_offset:
        keep = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(keep, axis=-1) * keep + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout.

    Rows are gathered in `param_dtype` and then cast to `dtype` (the same values as casting the
    table first), so the lookups' gradient, a scatter-add of every token's cotangent into its
    row, accumulates in `param_dtype`: a bf16 scatter-add rounds at every addition (all tokens
    share one token-type row) and is slow on GPU.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(name, size, ids):
            table = nn.Embed(size, cfg.hidden_size, name=name, dtype=self.param_dtype,
                             param_dtype=self.param_dtype, embedding_init=init)
            return table(ids).astype(self.dtype)

        x = (embed("word_embeddings", cfg.vocab_size, input_ids)
             + embed("position_embeddings", cfg.max_position_embeddings, position_ids)
             + embed("token_type_embeddings", cfg.type_vocab_size, token_type_ids))
        x = _layer_norm(cfg, "LayerNorm", self.dtype, self.param_dtype)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertLayer(nn.Module):
    """One post-LN transformer layer, as HF ``BertLayer``.

    Attention runs through `attention` (`jax.nn.dot_product_attention`; cuDNN's fused kernel on
    GPU) except in a training call (``deterministic=False``) with a nonzero
    ``attention_probs_dropout_prob``, which takes `attention_with_dropout`.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str | None = None  # `attention`'s implementation: None (auto), "xla", "cudnn"

    @nn.compact
    def __call__(self, h, mask, deterministic: bool = True):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        B, T, H = h.shape
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        heads = lambda x: x.reshape(B, T, nh, hd)
        q = heads(_dense(cfg, H, "query", dt, pdt)(h))
        k = heads(_dense(cfg, H, "key", dt, pdt)(h))
        v = heads(_dense(cfg, H, "value", dt, pdt)(h))
        if not deterministic and cfg.attention_probs_dropout_prob > 0:
            dropout = nn.Dropout(cfg.attention_probs_dropout_prob)
            ctx = attention_with_dropout(q, k, v, mask, dropout, deterministic)
        else:
            ctx = attention(q, k, v, mask, implementation=self.attention)
        a = _dense(cfg, H, "attention_output", dt, pdt)(ctx.reshape(B, T, H))
        a = nn.Dropout(cfg.hidden_dropout_prob)(a, deterministic=deterministic)
        h = _layer_norm(cfg, "attention_LayerNorm", dt, pdt)(h + a)
        f = _ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "intermediate", dt, pdt)(h))
        f = _dense(cfg, H, "output", dt, pdt)(f)
        f = nn.Dropout(cfg.hidden_dropout_prob)(f, deterministic=deterministic)
        return _layer_norm(cfg, "output_LayerNorm", dt, pdt)(h + f)


class BertEncoder(nn.Module):
    """HF ``BertModel`` without task heads: returns the final hidden states (B, T, hidden).

    With ``with_pooler=True`` returns ``(hidden, pooled)``, pooled = tanh(dense(hidden[:, 0])).
    `attention_mask` (B, T), 1 for real tokens and 0 for padding, defaults to all ones;
    `token_type_ids` default to zeros and `position_ids` to HF's defaults (`position_ids_for`).
    Enable dropout with ``deterministic=False`` and a ``"dropout"`` rng. `attention` picks the
    attention kernel (see `attention`; None: cuDNN on GPU where it applies, else XLA).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    with_pooler: bool = False
    attention: str | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True):
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = position_ids_for(cfg, input_ids)
        mask = jnp.asarray(attention_mask).astype(bool)
        h = BertEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic)
        for i in range(cfg.num_hidden_layers):
            h = BertLayer(cfg, self.dtype, self.param_dtype, self.attention, name=f"layer_{i}")(
                h, mask, deterministic)
        if not self.with_pooler:
            return h
        pooled = jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler", self.dtype, self.param_dtype)(h[:, 0]))
        return h, pooled


def pool(hidden, attention_mask, mode: str):
    """Sentence vector from hidden states: "mean" over real tokens (sentence-transformers'
    clamp of the count at 1e-9) or "cls" (the first token)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        m = jnp.asarray(attention_mask).astype(hidden.dtype)[..., None]
        return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    raise ValueError(f"pooling {mode!r} not one of {POOLINGS}")


class Classifier(nn.Module):
    """`BertEncoder` (submodule ``encoder``) + pooling + dropout + a new Dense ``head``.

    The head computes in float32 with float32 parameters whatever the encoder's dtypes, since it
    is trained fully. Returns float32 logits (B, num_classes).
    """

    config: BertConfig
    num_classes: int
    pooling: str = "mean"
    dropout_rate: float | None = None  # before the head; None: config.hidden_dropout_prob
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str | None = None  # the encoder's attention kernel (`attention`)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} not one of {POOLINGS}")
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        enc = BertEncoder(self.config, self.dtype, self.param_dtype,
                          with_pooler=self.pooling == "pooler", attention=self.attention,
                          name="encoder")
        out = enc(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        if self.pooling == "pooler":
            x = out[1]
        else:
            x = pool(out, attention_mask, self.pooling)
        rate = self.config.hidden_dropout_prob if self.dropout_rate is None else self.dropout_rate
        wide = jnp.promote_types(self.dtype, jnp.float32)  # float32, or float64 for a float64 model
        x = nn.Dropout(rate)(x.astype(wide), deterministic=deterministic)
        return _dense(self.config, self.num_classes, "head", wide, wide)(x)


def init_classifier(config: BertConfig, num_classes: int, key: jax.Array, encoder_params=None, *,
                    pooling: str = "mean", dropout_rate: float | None = None,
                    dtype=jnp.float32, param_dtype=jnp.float32, attention: str | None = None):
    """``(model, variables)``: a `Classifier` and its ``{"params": {"encoder": …, "head": …}}``.

    `encoder_params` (from `load_hf_safetensors`, which must include the pooler for
    ``pooling="pooler"``) are used as they are; the head is initialised fresh from `key`
    (normal(initializer_range) kernel, zero bias, as HF). Without `encoder_params` the whole
    model is initialised at random.
    """
    model = Classifier(config, num_classes, pooling=pooling, dropout_rate=dropout_rate,
                       dtype=dtype, param_dtype=param_dtype, attention=attention)
    if encoder_params is None:
        variables = model.init(key, jnp.zeros((1, 8), jnp.int32))
        return model, variables
    encoder_params = encoder_params.get("params", encoder_params)
    if pooling == "pooler" and "pooler" not in encoder_params:
        raise ValueError("pooling='pooler' needs the HF pooler weights: load with "
                         "load_hf_safetensors(..., with_pooler=True)")
    if pooling != "pooler":
        encoder_params = {k: v for k, v in encoder_params.items() if k != "pooler"}
    head = _dense(config, num_classes, "head", jnp.float32, jnp.float32)
    head_params = head.init(key, jnp.zeros((1, config.hidden_size), jnp.float32))["params"]
    variables = {"params": {"encoder": encoder_params, "head": head_params}}
    # Structure check against the module (shapes only, no compute).
    want = jax.eval_shape(model.init, key, jnp.zeros((1, 8), jnp.int32))
    got_s = jax.tree_util.tree_structure(variables)
    if jax.tree_util.tree_structure(want) != got_s:
        raise ValueError(f"encoder_params do not fit {config}:\n want {jax.tree_util.tree_structure(want)}"
                         f"\n got  {got_s}")
    bad = [(jax.tree_util.keystr(p), tuple(w.shape), tuple(g.shape))
           for (p, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(variables))
           if tuple(w.shape) != tuple(g.shape)]
    if bad:
        raise ValueError(f"encoder_params shapes do not fit the config: {bad[:8]}")
    return model, variables


# --------------------------------------------------------------------------------------------
# Hugging Face safetensors


# Keys a HF checkpoint may carry that the encoder does not use (buffers, pretraining/task heads).
DEFAULT_IGNORE = r"(^|\.)(position_ids|token_type_ids)$|^(cls|lm_head|classifier|qa_outputs|score)\."
_PREFIXES = ("bert.", "roberta.", "model.")


def hf_key_map(config: BertConfig, with_pooler: bool = False) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF key (no model prefix) → (path in the `BertEncoder` param tree, transpose?)."""
    m: dict[str, tuple[tuple[str, ...], bool]] = {}
    for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        m[f"embeddings.{n}.weight"] = (("embeddings", n, "embedding"), False)
    m["embeddings.LayerNorm.weight"] = (("embeddings", "LayerNorm", "scale"), False)
    m["embeddings.LayerNorm.bias"] = (("embeddings", "LayerNorm", "bias"), False)
    dense = {"attention.self.query": "query", "attention.self.key": "key",
             "attention.self.value": "value", "attention.output.dense": "attention_output",
             "intermediate.dense": "intermediate", "output.dense": "output"}
    norms = {"attention.output.LayerNorm": "attention_LayerNorm", "output.LayerNorm": "output_LayerNorm"}
    for i in range(config.num_hidden_layers):
        pre, layer = f"encoder.layer.{i}.", f"layer_{i}"
        for hf, ours in dense.items():
            m[pre + hf + ".weight"] = ((layer, ours, "kernel"), True)
            m[pre + hf + ".bias"] = ((layer, ours, "bias"), False)
        for hf, ours in norms.items():
            m[pre + hf + ".weight"] = ((layer, ours, "scale"), False)
            m[pre + hf + ".bias"] = ((layer, ours, "bias"), False)
    if with_pooler:
        m["pooler.dense.weight"] = (("pooler", "kernel"), True)
        m["pooler.dense.bias"] = (("pooler", "bias"), False)
    return m


def _normalise_key(k: str) -> str:
    for p in _PREFIXES:
        if k.startswith(p):
            k = k[len(p):]
            break
    if ".LayerNorm." in k or k.endswith("LayerNorm.gamma") or k.endswith("LayerNorm.beta"):
        k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
    return k


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no model.safetensors (or shards) in {path}")
    return found


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The raw HF state dict (HF key names → NumPy arrays) of a model dir or .safetensors file."""
    out: dict[str, np.ndarray] = {}
    for f in _safetensors_files(Path(path)):
        out.update(load_file(str(f)))
    return out


def convert_state_dict(state: dict[str, np.ndarray], config: BertConfig, *, with_pooler: bool = False,
                       ignore: str | None = DEFAULT_IGNORE, dtype=None) -> dict:
    """Map a HF BERT/RoBERTa state dict onto the `BertEncoder` param tree (see `load_hf_safetensors`)."""
    keymap = hf_key_map(config, with_pooler)
    ignore_re = re.compile(ignore) if ignore else None
    found: dict[str, str] = {}
    unexpected: list[str] = []
    for raw in state:
        k = _normalise_key(raw)
        if k in keymap:
            if k in found:
                raise ValueError(f"checkpoint holds {k!r} twice: {found[k]!r} and {raw!r}")
            found[k] = raw
        elif k.startswith("pooler.") and not with_pooler:
            continue
        elif ignore_re is not None and ignore_re.search(k):
            continue
        else:
            unexpected.append(raw)
    missing = [k for k in keymap if k not in found]
    if missing or unexpected:
        raise ValueError(
            f"HF checkpoint does not match a {config.model_type} encoder with "
            f"{config.num_hidden_layers} layers (with_pooler={with_pooler}):\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}")
    params: dict = {}
    shapes = _expected_shapes(config)
    for k, raw in found.items():
        path, transpose = keymap[k]
        x = np.asarray(state[raw])
        if transpose:
            x = x.T
        want = shapes.get(path[-2:] if path[0].startswith("layer_") else path)
        if want is not None and tuple(x.shape) != want:
            raise ValueError(f"{raw!r}: shape {tuple(x.shape)} (after transpose={transpose}) does not "
                             f"match the config, which needs {want}")
        x = jnp.asarray(x, dtype=dtype if dtype is not None and np.issubdtype(x.dtype, np.floating) else None)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = x
    return params


def _expected_shapes(cfg: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    H, F = cfg.hidden_size, cfg.intermediate_size
    s = {("embeddings", "word_embeddings", "embedding"): (cfg.vocab_size, H),
         ("embeddings", "position_embeddings", "embedding"): (cfg.max_position_embeddings, H),
         ("embeddings", "token_type_embeddings", "embedding"): (cfg.type_vocab_size, H),
         ("embeddings", "LayerNorm", "scale"): (H,), ("embeddings", "LayerNorm", "bias"): (H,),
         ("pooler", "kernel"): (H, H), ("pooler", "bias"): (H,)}
    for n in ("query", "key", "value", "attention_output"):
        s[(n, "kernel")], s[(n, "bias")] = (H, H), (H,)
    s[("intermediate", "kernel")], s[("intermediate", "bias")] = (H, F), (F,)
    s[("output", "kernel")], s[("output", "bias")] = (F, H), (H,)
    for n in ("attention_LayerNorm", "output_LayerNorm"):
        s[(n, "scale")], s[(n, "bias")] = (H,), (H,)
    return s


def load_hf_safetensors(path: str | Path, *, with_pooler: bool = False,
                        ignore: str | None = DEFAULT_IGNORE, dtype=None) -> tuple[BertConfig, dict]:
    """``(config, params)`` from a HF model directory (``config.json`` + ``model.safetensors``,
    or sharded ``model.safetensors.index.json``), such as all-MiniLM-L6-v2, bert-base-uncased or
    roberta-base as saved by ``save_pretrained``.

    `params` is the `BertEncoder` param tree (no ``{"params": …}`` wrapper). Keys may carry a
    ``bert.``/``roberta.`` prefix and legacy LayerNorm ``gamma``/``beta`` names; Linear weights,
    stored (out, in) by PyTorch, are transposed to (in, out). Keys matching `ignore` (buffers such
    as ``position_ids`` and pretraining/task heads ``cls.*``, ``lm_head.*``, ``classifier.*``) are
    skipped, as is ``pooler.*`` unless `with_pooler`. Any other unknown key, or a missing one,
    raises `ValueError` listing them all. `dtype` casts floating weights (e.g. ``jnp.bfloat16``).
    """
    path = Path(path)
    cfg_dir = path if path.is_dir() else path.parent
    config = BertConfig.from_json(cfg_dir / "config.json")
    state = load_state_dict(path)
    return config, convert_state_dict(state, config, with_pooler=with_pooler, ignore=ignore, dtype=dtype)
