"""train/llama.py on a tiny random Llama written as a real GGUF file, against a float64 NumPy oracle.

The GGUF is written here with ``gguf.GGUFWriter`` the way llama.cpp's converter writes one: HF-layout
weights, ``attn_q``/``attn_k`` rows permuted for ggml's RoPE, F32 norms, a Q8_0 embedding and some
Q4_1 projections (``gguf.quants.quantize``), and the tokenizer of a tiny byte-level BPE trained here
with ``tokenizers`` in the metadata. The oracle computes HF's ``LlamaForCausalLM`` in float64 from the
HF-layout weights (the quantized ones as the file holds them), written independently of the module
(RoPE as explicit pair rotations, attention head by head).

The real-checkpoint cross-check against transformers is the slow test at the end
(``support/llama_crosscheck.py``).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

import lora_jax  # noqa: E402
from train import llama  # noqa: E402
from train.gguf_tokenizer import LlamaTokenizer, render_chatml  # noqa: E402

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "what is twelve plus thirty? twelve plus thirty is forty-two",
    "def add(a, b):\n    return a + b\n",
    "numbers 12 30 42 100 2025 and more numbers",
    "the quick brown fox jumps over the lazy dog " * 3,
]
DIMS = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, theta=500.0, eps=1e-5)
# tensors stored quantized (the rest F32): a Q/K pair, so the row permutation meets blocks
QUANTIZED = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "blk.1.attn_k.weight": Q.Q8_0,
             "blk.0.ffn_gate.weight": Q.Q4_1, "blk.1.ffn_down.weight": Q.Q8_0}


# ------------------------------------------------------------------------------------------------
# the tiny checkpoint


def train_tiny_bpe() -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def bpe_tables(tok):
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def llama_cpp_permute(w, n_head):
    """``permute`` of llama.cpp's convert_hf_to_gguf.py, copied (not train.llama's)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def stored(name, w):
    """What the file holds for HF-layout weight `w` (float64) and what it dequantizes to."""
    qt = QUANTIZED.get(name, Q.F32)
    if qt == Q.F32:
        data = w.astype(np.float32)
        return data, data.astype(np.float64)
    data = gguf.quants.quantize(w.astype(np.float32), qt)
    return data, gguf.quants.dequantize(data, qt).astype(np.float64)


def random_hf_weights(vocab, tied, seed=0):
    d, rng = DIMS, np.random.default_rng(seed)
    H, F, hd = d["hidden"], d["ffn"], d["hidden"] // d["heads"]
    n = lambda *s, std=0.15: rng.normal(0, std, s)
    w = {"model.embed_tokens.weight": n(vocab, H, std=0.5), "model.norm.weight": 1 + n(H, std=0.1)}
    if not tied:
        w["lm_head.weight"] = n(vocab, H)
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + n(H, std=0.1),
                  p + "post_attention_layernorm.weight": 1 + n(H, std=0.1),
                  p + "self_attn.q_proj.weight": n(d["heads"] * hd, H),
                  p + "self_attn.k_proj.weight": n(d["kv_heads"] * hd, H),
                  p + "self_attn.v_proj.weight": n(d["kv_heads"] * hd, H),
                  p + "self_attn.o_proj.weight": n(H, d["heads"] * hd),
                  p + "mlp.gate_proj.weight": n(F, H), p + "mlp.up_proj.weight": n(F, H),
                  p + "mlp.down_proj.weight": n(H, F)})
    return w


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def write_tiny_gguf(path, tok, *, tied=True, drop=(), seed=0):
    """Write the GGUF; returns the HF-layout float64 weights as the file holds them."""
    d = DIMS
    tokens, merges = bpe_tables(tok)
    weights = random_hf_weights(len(tokens), tied, seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(d["layers"])
    w.add_context_length(256)
    w.add_embedding_length(d["hidden"])
    w.add_feed_forward_length(d["ffn"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_rope_freq_base(d["theta"])
    w.add_layer_norm_rms_eps(d["eps"])
    w.add_rope_dimension_count(d["hidden"] // d["heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(SMOLLM2_TEMPLATE)
    held = {}
    for hf, x in weights.items():
        name = gguf_name(hf)
        if name in drop:
            continue
        if name.endswith("attn_q.weight"):
            x_file = llama_cpp_permute(x, d["heads"])
        elif name.endswith("attn_k.weight"):
            x_file = llama_cpp_permute(x, d["kv_heads"])
        else:
            x_file = x
        data, _ = stored(name, x_file)
        # quantization is per row (blocks along the input axis), so it commutes with the row permutation
        held[hf] = stored(name, x)[1]
        w.add_tensor(name, data, raw_dtype=QUANTIZED.get(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = train_tiny_bpe()
    path = tmp_path_factory.mktemp("llama") / "tiny.gguf"
    held = write_tiny_gguf(path, tok)
    config, params = llama.load_gguf(path)
    return dict(path=path, tok=tok, held=held, config=config, params=params, model=llama.Llama(config))


# ------------------------------------------------------------------------------------------------
# the float64 oracle


def oracle_logits(w, ids, tied=True):
    """HF LlamaForCausalLM in float64 NumPy for one sequence of ids (no padding)."""
    d = DIMS
    H, nh, kvh = d["hidden"], d["heads"], d["kv_heads"]
    hd = H // nh
    T = len(ids)

    def rms(x, g):
        return g * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + d["eps"]))

    def rope(x):  # x (T, heads, hd): rotate the pair (j, j + hd/2) by pos · θ^(−2j/hd)
        ang = np.arange(T)[:, None] * d["theta"] ** (-2.0 * np.arange(hd // 2) / hd)
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    h = w["model.embed_tokens.weight"][ids]
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = rope((x @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd))
        k = rope((x @ w[p + "self_attn.k_proj.weight"].T).reshape(T, kvh, hd))
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(T, kvh, hd)
        heads = []
        for j in range(nh):
            kv = j // (nh // kvh)
            s = q[:, j] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            heads.append((e / e.sum(-1, keepdims=True)) @ v[:, kv])
        h = h + np.concatenate(heads, axis=-1) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        g, u = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    h = rms(h, w["model.norm.weight"])
    return h @ (w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]).T


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------------------
# loading and the forward pass


def test_config_from_gguf_metadata(tiny):
    c, d = tiny["config"], DIMS
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (d["hidden"], d["ffn"], d["layers"])
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (d["heads"], d["kv_heads"], 16)
    assert c.rope_theta == d["theta"] and c.rms_norm_eps == pytest.approx(d["eps"])
    assert c.tie_word_embeddings and "lm_head" not in tiny["params"]
    assert c.eos_token_id == tiny["tok"].token_to_id("<|im_end|>")


def test_logits_match_float64_oracle(tiny):
    ids = [5, 77, 130, 9, 250, 31, 31, 64, 200, 3, 100, 17]
    ours = tiny["model"].apply({"params": tiny["params"]}, jnp.asarray([ids]))[0]
    err = rel_err(ours, oracle_logits(tiny["held"], ids))
    print(f"tiny GGUF Llama vs float64 oracle: max rel err {err:.2e}")
    assert err <= 1e-4


def test_logits_without_qk_unpermutation_differ(tiny):
    """The oracle test can see the RoPE row order: loading with the rows left as GGUF stores them
    gives other logits."""
    p = jax.tree_util.tree_map(lambda x: x, tiny["params"])
    d = DIMS
    for i in range(d["layers"]):
        a = p[f"layers_{i}"]["self_attn"]
        a["q_proj"]["kernel"] = jnp.asarray(llama_cpp_permute(np.asarray(a["q_proj"]["kernel"]).T, d["heads"]).T)
        a["k_proj"]["kernel"] = jnp.asarray(llama_cpp_permute(np.asarray(a["k_proj"]["kernel"]).T, d["kv_heads"]).T)
    ids = [5, 77, 130, 9, 250, 31]
    ours = tiny["model"].apply({"params": p}, jnp.asarray([ids]))[0]
    assert rel_err(ours, oracle_logits(tiny["held"], ids)) > 1e-2


def test_untied_head_and_hf_safetensors_load_the_same(tmp_path):
    """An untied GGUF (output.weight) against the oracle, and the same weights as a HF directory
    (config.json + model.safetensors, (out, in) Linear weights) load to the same params."""
    from safetensors.numpy import save_file

    tok = train_tiny_bpe()
    held = write_tiny_gguf(tmp_path / "untied.gguf", tok, tied=False, seed=1)
    config, params = llama.load_gguf(tmp_path / "untied.gguf")
    assert not config.tie_word_embeddings and params["lm_head"]["kernel"].shape == (DIMS["hidden"], config.vocab_size)
    ids = [1, 40, 41, 42, 200, 7]
    err = rel_err(llama.Llama(config).apply({"params": params}, jnp.asarray([ids]))[0],
                  oracle_logits(held, ids, tied=False))
    assert err <= 1e-4

    d = DIMS
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({k: v.astype(np.float32) for k, v in held.items()}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": config.vocab_size, "hidden_size": d["hidden"],
        "intermediate_size": d["ffn"], "num_hidden_layers": d["layers"], "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"], "rms_norm_eps": d["eps"], "rope_theta": d["theta"],
        "max_position_embeddings": 256, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id}))
    hf_config, hf_params = llama.load(hf)
    # GGUF stores eps as float32 (9.99999975e-06), config.json as written
    assert hf_config.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(hf_config, rms_norm_eps=config.rms_norm_eps) == config
    same = jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, hf_params)
    assert all(jax.tree_util.tree_leaves(same))


def test_loader_errors_name_the_problem(tmp_path):
    tok = train_tiny_bpe()
    write_tiny_gguf(tmp_path / "bad.gguf", tok, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing \(1\): \['blk.1.ffn_up.weight'\]"):
        llama.load_gguf(tmp_path / "bad.gguf")
    with pytest.raises(FileNotFoundError, match="smollm2_gguf"):
        llama.load(tmp_path / "nowhere.gguf")
    with pytest.raises(NotImplementedError, match="rope scaling 'llama3'"):
        llama.LlamaConfig.from_hf_dict({"hidden_size": 64, "num_attention_heads": 4,
                                        "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


# ------------------------------------------------------------------------------------------------
# generation


def argmax_loop(model, params, ids, n):
    """Greedy decoding without a cache: the whole sequence again for every token. The sequence is
    right-padded to one length (causal attention: padding after a position cannot change its
    logits), so the forward compiles once."""
    width = len(ids) + n
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    seq = list(ids)
    for _ in range(n):
        x = jnp.asarray([seq + [0] * (width - len(seq))])
        seq.append(int(jnp.argmax(forward(params, x)[0, len(seq) - 1])))
    return seq[len(ids):]


def test_kv_cache_generation_equals_no_cache_argmax_loop(tiny):
    """A batch of prompts of different lengths (left-padded inside `generate`) decoded with the KV
    cache gives each row's own cache-free argmax continuation."""
    model, params = tiny["model"], tiny["params"]
    prompts = [[5, 77, 130, 9, 250, 31, 64], [100, 17, 3]]
    n = 10
    got = llama.generate(model, params, prompts, n, eos_id=-1)
    want = [argmax_loop(model, params, p, n) for p in prompts]
    print("generated:", got.tolist())
    assert got.tolist() == want
    assert len(set(want[0])) > 1  # not a degenerate repeat, so the cache's positions matter
    # a wider padding (one width for many batches, as train.lm uses) changes nothing
    assert llama.generate(model, params, prompts, n, eos_id=-1, width=12).tolist() == want
    with pytest.raises(ValueError, match="width 5 is shorter"):
        llama.generate(model, params, prompts, n, eos_id=-1, width=5)


def test_generation_stops_at_eos_and_pads(tiny):
    model, params = tiny["model"], tiny["params"]
    prompt = [5, 77, 130, 9]
    free = argmax_loop(model, params, prompt, 8)
    eos = free[3]
    k = free.index(eos)
    got = llama.generate(model, params, [prompt], 8, eos_id=eos, pad_id=0)[0].tolist()
    assert got == free[: k + 1] + [0] * (8 - k - 1)


def test_top_p_sampling_keeps_the_nucleus_and_its_odds():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k: llama.sample_token(logits, k, 1.0, 0.75)[0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=5)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 ≥ 0.75: only the first two are in the nucleus
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    # a tiny top_p is greedy; temperature 0 is argmax
    assert int(llama.sample_token(logits, keys[0], 1.0, 1e-6)[0]) == 0
    assert int(llama.sample_token(logits, keys[0], 0.0, 1.0)[0]) == 0


def test_sampled_generation_is_reproducible_and_in_vocab(tiny):
    model, params = tiny["model"], tiny["params"]
    a = llama.generate(model, params, [[5, 6, 7]], 6, temperature=0.8, top_p=0.9, key=jax.random.key(1), eos_id=-1)
    b = llama.generate(model, params, [[5, 6, 7]], 6, temperature=0.8, top_p=0.9, key=jax.random.key(1), eos_id=-1)
    assert (a == b).all() and ((0 <= a) & (a < tiny["config"].vocab_size)).all()


# ------------------------------------------------------------------------------------------------
# LoRA


def test_lora_runs_factored_and_matches_merged(tiny):
    model, params, config = tiny["model"], tiny["params"], tiny["config"]
    ids = jnp.asarray([[5, 77, 130, 9, 250, 31, 64, 2]])
    forward = lambda p, x: model.apply({"params": p}, x)
    layout = lora_jax.layout_of(forward, params, ids)
    adapted = lora_jax.apply(params, rank=4, alpha=8, targets=llama.LORA_TARGETS, layout=layout,
                             key=jax.random.key(0))
    nodes = [x for x in jax.tree_util.tree_leaves(adapted, is_leaf=lora_jax.is_lora) if lora_jax.is_lora(x)]
    assert len(nodes) == 7 * config.num_hidden_layers and all(n.roles == "io" for n in nodes)
    adapted = with_random_b(adapted)  # b ≠ 0, so the adapters change the function
    merged = lora_jax.merge(adapted)
    factored = lora_jax.wrap(forward, strict=True)(adapted, ids)
    ref = forward(merged, ids)
    base = forward(params, ids)
    err = rel_err(factored, np.asarray(ref, np.float64))
    print(f"LoRA factored vs merged: max rel err {err:.2e}")
    assert err <= 1e-5 and rel_err(base, np.asarray(ref, np.float64)) > 1e-3
    # generation with LoRA nodes runs factored and equals generation with the merged weights
    g1 = llama.generate(model, adapted, [[5, 77, 130]], 5, eos_id=-1)
    g2 = llama.generate(model, merged, [[5, 77, 130]], 5, eos_id=-1)
    assert (g1 == g2).all()


def with_random_b(adapted):
    import equinox as eqx

    leaves, tdef = jax.tree_util.tree_flatten(adapted, is_leaf=lora_jax.is_lora)
    key = jax.random.key(1)
    out = []
    for x in leaves:
        if lora_jax.is_lora(x):
            key, k = jax.random.split(key)
            x = eqx.tree_at(lambda n: n.b, x, 0.1 * jax.random.normal(k, x.b.shape, x.b.dtype))
        out.append(x)
    return jax.tree_util.tree_unflatten(tdef, out)


# ------------------------------------------------------------------------------------------------
# tokenizer and chat template

TEXTS = ["the cat sat on the mat", "twelve plus thirty", "  spaces  and\ttabs\n", "naïve café 日本 😀",
         "def add(a, b):\n    return a + b", "12 + 30 = 42", "<|im_start|>user\nhi<|im_end|>\n", "", "x<|im_end|>y"]


def test_gguf_tokenizer_equals_the_trained_bpe_and_round_trips(tiny):
    ours = LlamaTokenizer.from_gguf(tiny["path"])
    ref = tiny["tok"]
    for t in TEXTS:
        ids = ours.encode(t)
        assert ids == ref.encode(t).ids, t
        assert ours.decode(ids) == t
    assert ours.encode("<|im_end|>") == [ref.token_to_id("<|im_end|>")]  # a special token stays whole
    assert len(ours.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges applied
    assert ours.vocab_size == ref.get_vocab_size()
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (ref.token_to_id("<|im_start|>"), ref.token_to_id("<|im_end|>"), False)


def test_chatml_template():
    msgs = [{"role": "user", "content": "What is 12 plus 30?"}]
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chatml(SMOLLM2_TEMPLATE, msgs) == want
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert render_chatml(SMOLLM2_TEMPLATE, sys_msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n")
    with pytest.raises(NotImplementedError, match="jinja2"):
        render_chatml("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }}{% endfor %}", msgs)


def test_chat_ids_through_the_tokenizer(tiny):
    tok = LlamaTokenizer.from_gguf(tiny["path"])
    ids = tok.chat_ids([{"role": "user", "content": "hi"}])
    start, end = tok.encode("<|im_start|>"), tok.encode("<|im_end|>")
    assert ids[:1] == start and ids.count(end[0]) == 2 and tok.decode(ids).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------
# the real checkpoint against transformers (slow)


@pytest.mark.slow
def test_smollm2_matches_transformers(tmp_path):
    from support import llama_crosscheck
    from train.assets import AssetError

    try:
        res = llama_crosscheck.run(tmp_path, verbose=False)
    except llama_crosscheck.PeersUnavailable as e:
        pytest.skip(str(e))
    except AssetError as e:
        pytest.skip(f"SmolLM2 GGUF not available offline: {e}")
    print(llama_crosscheck.report(res))
    assert res["tokenizer"]["equal"] == res["tokenizer"]["strings"] == 200
    assert all(res["chat_template_ids_equal"])
    assert res["logits"]["max_rel_err"] <= 1e-4 and all(res["logits"]["argmax_equal"])
    assert all(res["generation"]["equal_with_eos"]) and all(res["generation"]["equal_32_no_eos"])
    assert res["hf_safetensors"]["max_abs_weight_diff"] == 0 and res["hf_safetensors"]["config_equal"]
