"""`train.bert`: the Flax BERT encoder against an independent float64 NumPy forward pass of the
real all-MiniLM-L6-v2 safetensors on real tokenised sentences; the loader's key checks; LoRA on
the classifier (starts at the base model, gradients reach adapters and head, nothing materialises).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")
from scipy.special import erf  # noqa: E402

import jax.numpy as jnp  # noqa: E402

import lora_jax  # noqa: E402
from train.bert import (  # noqa: E402
    LORA_TARGETS,
    BertConfig,
    BertEncoder,
    convert_state_dict,
    init_classifier,
    load_hf_safetensors,
    load_state_dict,
    position_ids_for,
)

SENTENCES = [
    "The movie was a delight from start to finish.",
    "An overlong, tedious mess with nothing to say.",
    "I didn't expect much, but the second half surprised me.",
    "Flat.",
    "It's a smart, funny and often touching look at family life, even if the ending drags.",
]
REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# independent float64 reference, straight from the HF state dict


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_bert(sd, hf_config: dict, ids, mask, prefix=""):
    """HF BertModel/RobertaModel's last_hidden_state, float64, from HF-named weights."""
    g = lambda k: np.asarray(sd[prefix + k], np.float64)
    nl, nh = hf_config["num_hidden_layers"], hf_config["num_attention_heads"]
    eps = hf_config["layer_norm_eps"]
    B, T = ids.shape
    hd = hf_config["hidden_size"] // nh
    if hf_config.get("model_type") == "roberta":
        pad = hf_config["pad_token_id"]
        pos = np.cumsum(ids != pad, axis=1) * (ids != pad) + pad
    else:
        pos = np.broadcast_to(np.arange(T), (B, T))
    x = (g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[pos]
         + g("embeddings.token_type_embeddings.weight")[np.zeros_like(ids)])
    x = _ln(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
    for i in range(nl):
        p = f"encoder.layer.{i}."
        lin = lambda h, n: h @ g(p + n + ".weight").T + g(p + n + ".bias")
        heads = lambda h: h.reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
        q, k, v = (heads(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
        x = _ln(x + lin(ctx, "attention.output.dense"), g(p + "attention.output.LayerNorm.weight"),
                g(p + "attention.output.LayerNorm.bias"), eps)
        f = lin(x, "intermediate.dense")
        f = 0.5 * f * (1.0 + erf(f / np.sqrt(2.0)))
        x = _ln(x + lin(f, "output.dense"), g(p + "output.LayerNorm.weight"),
                g(p + "output.LayerNorm.bias"), eps)
    return x


def rel_errors(got, ref):
    got = np.asarray(got, np.float64)
    return (np.linalg.norm(got - ref) / np.linalg.norm(ref),
            np.abs(got - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def minilm_dir():
    from train.assets import minilm_dir as fetch  # cached in ~/.cache/lora_jax after first use

    try:
        return fetch()
    except Exception as e:  # offline and not cached
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e!r}")


@pytest.fixture(scope="module")
def batch(minilm_dir):
    tok = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest, not the file's 128
    enc = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    assert (mask == 0).any() and ids[0, 0] == 101  # real padding, [CLS] first
    return ids, mask


@pytest.fixture(scope="module")
def loaded(minilm_dir):
    return load_hf_safetensors(minilm_dir)


@pytest.fixture(scope="module")
def state_dict(minilm_dir):
    return load_state_dict(minilm_dir)


@pytest.fixture(scope="module")
def hidden(loaded, batch):
    config, params = loaded
    return jax.jit(BertEncoder(config).apply)({"params": params}, *batch)


# ---------------------------------------------------------------------------------------------
# the acceptance check


def test_minilm_matches_float64_numpy(minilm_dir, loaded, state_dict, batch, hidden):
    import json

    config, params = loaded
    hf_config = json.loads((minilm_dir / "config.json").read_text())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.vocab_size) == (384, 6, 12, 1536, 30522)
    ids, mask = batch
    ref = numpy_bert(state_dict, hf_config, ids, mask)
    got = hidden
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    fro, mx = rel_errors(got, ref)
    print(f"\nMiniLM float32 Flax vs float64 NumPy on {ids.shape} tokens: "
          f"relative Frobenius error {fro:.2e}, max-abs error / max-abs {mx:.2e}")
    assert fro <= REL_TOL and mx <= REL_TOL


def test_minilm_bf16_params_close(loaded, state_dict, batch, minilm_dir):
    import json

    config, params = load_hf_safetensors(minilm_dir, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids, mask = batch
    hf_config = json.loads((minilm_dir / "config.json").read_text())
    ref = numpy_bert(state_dict, hf_config, ids, mask)
    got = jax.jit(BertEncoder(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply)(
        {"params": params}, ids, mask)
    assert got.dtype == jnp.bfloat16
    fro, _ = rel_errors(got.astype(jnp.float32), ref)
    assert fro < 5e-2, fro


# ---------------------------------------------------------------------------------------------
# loader


def test_loader_reports_missing_and_unexpected(state_dict, loaded):
    config, _ = loaded
    sd = dict(state_dict)
    del sd["encoder.layer.3.output.dense.bias"]
    sd["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        convert_state_dict(sd, config)
    msg = str(e.value)
    assert "missing keys (1): ['encoder.layer.3.output.dense.bias']" in msg
    assert "unexpected keys (1): ['encoder.layer.0.attention.self.rotary.weight']" in msg
    # a checkpoint with more layers than the config says
    sd = dict(state_dict)
    sd["encoder.layer.6.output.dense.bias"] = np.zeros(384, np.float32)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\)"):
        convert_state_dict(sd, config)
    # pooler: skipped by default, loaded on request
    assert "pooler" not in loaded[1]
    with_pooler = convert_state_dict(state_dict, config, with_pooler=True)
    assert with_pooler["pooler"]["kernel"].shape == (384, 384)
    np.testing.assert_array_equal(with_pooler["pooler"]["kernel"], state_dict["pooler.dense.weight"].T)


def test_loader_shape_mismatch(state_dict, loaded):
    config, _ = loaded
    sd = dict(state_dict)
    sd["encoder.layer.2.intermediate.dense.weight"] = sd["encoder.layer.2.intermediate.dense.weight"].T
    with pytest.raises(ValueError, match="intermediate.dense.weight"):
        convert_state_dict(sd, config)


def test_roberta_prefix_legacy_names_and_positions():
    """A small random RoBERTa-style checkpoint: ``roberta.`` prefix, LayerNorm gamma/beta, a
    ``lm_head`` to ignore, positions from pad_token_id + 1, padding skipped."""
    hf = dict(model_type="roberta", vocab_size=50, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64, max_position_embeddings=20,
              type_vocab_size=1, layer_norm_eps=1e-5, hidden_act="gelu", pad_token_id=1)
    config = BertConfig.from_dict(hf)
    assert config.position_offset == 2
    rng = np.random.default_rng(0)
    r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)
    H, F = 32, 64
    sd = {"roberta.embeddings.word_embeddings.weight": r(50, H),
          "roberta.embeddings.position_embeddings.weight": r(20, H),
          "roberta.embeddings.token_type_embeddings.weight": r(1, H),
          "roberta.embeddings.LayerNorm.gamma": 1 + r(H), "roberta.embeddings.LayerNorm.beta": r(H),
          "roberta.embeddings.position_ids": np.arange(20)[None],
          "lm_head.dense.weight": r(H, H)}
    for i in range(2):
        p = f"roberta.encoder.layer.{i}."
        for n, (o, ii) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                           "attention.self.value": (H, H), "attention.output.dense": (H, H),
                           "intermediate.dense": (F, H), "output.dense": (H, F)}.items():
            sd[p + n + ".weight"], sd[p + n + ".bias"] = r(o, ii), r(o)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + n + ".gamma"], sd[p + n + ".beta"] = 1 + r(H), r(H)
    params = convert_state_dict(sd, config)
    ids = np.array([[0, 5, 7, 9, 2, 1, 1], [0, 11, 2, 1, 1, 1, 1]], np.int32)  # 1 = <pad>
    mask = (ids != 1).astype(np.int32)
    np.testing.assert_array_equal(position_ids_for(config, ids)[0], [2, 3, 4, 5, 6, 1, 1])
    # the reference reads the un-prefixed, modern names
    plain = {k.removeprefix("roberta.").replace(".gamma", ".weight").replace(".beta", ".bias"): v
             for k, v in sd.items()}
    ref = numpy_bert(plain, hf, ids, mask)
    got = BertEncoder(config).apply({"params": params}, ids, mask)
    fro, mx = rel_errors(got, ref)
    assert fro <= REL_TOL and mx <= REL_TOL, (fro, mx)


# ---------------------------------------------------------------------------------------------
# classifier + LoRA


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_pooling(loaded, batch, hidden, pooling):
    config, params = loaded
    model, variables = init_classifier(config, 3, jax.random.key(1), params, pooling=pooling)
    assert set(variables["params"]) == {"encoder", "head"}
    assert variables["params"]["head"]["kernel"].shape == (384, 3)
    ids, mask = batch
    logits = jax.jit(model.apply)(variables, ids, mask)
    h = hidden
    if pooling == "mean":
        m = mask[..., None]
        pooled = (h * m).sum(1) / m.sum(1)
    else:
        pooled = h[:, 0]
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-5)


def test_classifier_hf_pooler(state_dict, loaded, batch):
    config, _ = loaded
    params = convert_state_dict(state_dict, config, with_pooler=True)
    model, variables = init_classifier(config, 2, jax.random.key(0), params, pooling="pooler")
    assert "pooler" in variables["params"]["encoder"]
    ids, mask = batch
    assert model.apply(variables, ids, mask).shape == (len(SENTENCES), 2)
    with pytest.raises(ValueError, match="with_pooler=True"):
        init_classifier(config, 2, jax.random.key(0), loaded[1], pooling="pooler")


def test_lora_starts_at_base_and_grads_reach_adapters_and_head(loaded, batch):
    config, params = loaded
    model, variables = init_classifier(config, 2, jax.random.key(0), params, pooling="mean")
    adapted = lora_jax.apply(variables, rank=8, targets=LORA_TARGETS, key=jax.random.key(2))
    nodes = [p for p, x in jax.tree_util.tree_leaves_with_path(adapted, is_leaf=lora_jax.is_lora)
             if lora_jax.is_lora(x)]
    assert len(nodes) == 6 * config.num_hidden_layers
    ids, mask = batch
    fwd = lora_jax.wrap(model.apply)
    base = jax.jit(model.apply)(variables, ids, mask)
    np.testing.assert_allclose(jax.jit(fwd)(adapted, ids, mask), base, rtol=1e-6, atol=1e-6)

    trainable, frozen = lora_jax.split(adapted, trainable="head")
    labels = jnp.array([1, 0, 1, 0, 1])

    def loss(t, f):
        logits = fwd(lora_jax.combine(t, f), ids, mask, deterministic=False,
                     rngs={"dropout": jax.random.key(3)})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    grads = jax.jit(jax.grad(loss))(trainable, frozen)
    g = grads["params"]
    assert g["head"]["kernel"].shape == (384, 2) and float(jnp.abs(g["head"]["kernel"]).sum()) > 0
    for layer in range(config.num_hidden_layers):
        for n in ("query", "key", "value", "attention_output", "intermediate", "output"):
            node = g["encoder"][f"layer_{layer}"][n]["kernel"]
            assert lora_jax.is_lora(node) and node.w is None
            assert node.a.shape[-1] == 8 and node.b.shape[0] == 8
            assert np.isfinite(node.b).all() and float(jnp.abs(node.b).sum()) > 0
    # nothing else is trainable: every other leaf of the trainable half is a hole
    plain = [p for p, x in jax.tree_util.tree_leaves_with_path(g, is_leaf=lora_jax.is_lora)
             if not lora_jax.is_lora(x)]
    assert all("head" in jax.tree_util.keystr(p) for p in plain), plain
