"""Language-model adapters out of the project: PEFT for the Llama architecture both ways
(`train.peft_format`), the merged HF directory and GGUF (`train.lm_export`), and train.lm's
``--export-*`` flags; on test_llama's tiny random Llama written as a real GGUF.

Oracles independent of the code under test: merged weights in float64 NumPy from the nodes'
factors (``W + s·(a b)ᵀ``, DoRA's ``m ⊙ V/‖V‖``), test_llama's copy of llama.cpp's ``permute``
and its float64 forward (`oracle_logits`). The cross-checks against transformers and PEFT
(real SmolLM2, the peers' venv) are the slow test at the end (`support.lm_export_check`).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import lora_jax  # noqa: E402
from helpers import merged_weight_np, randomize_adapters  # noqa: E402
from test_llama import DIMS, llama_cpp_permute, oracle_logits, train_tiny_bpe, write_tiny_gguf  # noqa: E402
from train import llama, lm_export, peft_format  # noqa: E402

IDS = [5, 17, 33, 90, 120, 7, 64, 200]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tiny.gguf"
    write_tiny_gguf(path, train_tiny_bpe())
    config, params = llama.load_gguf(path)
    return dict(path=path, config=config, params=params, model=llama.Llama(config), tok=llama.load_tokenizer(path))


def adapted(params, *, rank=4, dora=False, seed=1, targets=llama.LORA_TARGETS):
    """LoRA (or DoRA) on `targets` with random a, b (b nonzero, as after some steps) and, for DoRA,
    magnitudes moved off their init."""
    tree = lora_jax.apply(params, rank=rank, alpha=2.0 * rank, targets=targets, key=jax.random.key(seed), dora=dora)
    tree = randomize_adapters(tree, jax.random.key(seed + 100), std=0.1)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: dataclasses.replace(x, m=x.m * jnp.asarray(1 + 0.1 * rng.standard_normal(x.m.shape),
                                                                             x.m.dtype))
                        if lora_jax.is_lora(x) and x.m is not None else x, tree, is_leaf=lora_jax.is_lora)


def merged64(tree, config) -> dict:
    """HF-named float64 weights of an adapted tree, merged by the definition (not lora_jax.merge)."""
    out = {}
    for key, (path, transpose) in llama.hf_key_map(config).items():
        node = tree
        for p in path:
            node = node[p]
        if lora_jax.is_lora(node):
            v = merged_weight_np(node)
            if node.m is not None:
                v = np.asarray(node.m, np.float64) * v / np.linalg.norm(v, axis=0)
            x = v
        else:
            x = np.asarray(node, np.float64)
        out[key] = x.T if transpose else x
    return out


def logits(tiny, params):
    return np.asarray(lora_jax.wrap(tiny["model"].apply)({"params": params}, jnp.asarray([IDS]))[0])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------------------
# PEFT, Llama


def test_peft_llama_names_orientation_and_config(tiny, tmp_path):
    tree = adapted(tiny["params"])
    peft_format.export_peft(tmp_path, tree, tiny["config"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    from safetensors.numpy import load_file

    t = load_file(tmp_path / "adapter_model.safetensors")
    layers, H = DIMS["layers"], DIMS["hidden"]
    mods = [f"model.layers.{i}.{m}" for i in range(layers) for m in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == sorted(mods) and cfg["modules_to_save"] is None and not cfg["use_dora"]
    assert sorted(t) == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in mods for x in "AB")
    q = tree["layers_1"]["self_attn"]["k_proj"]["kernel"]
    A, B = t["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"], \
        t["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert A.shape == (4, H) and B.shape == (DIMS["kv_heads"] * H // DIMS["heads"], 4)
    np.testing.assert_array_equal(A, np.asarray(q.a).T)
    np.testing.assert_array_equal(B, np.asarray(q.b).T)
    # PEFT's delta (out, in) = s·B A is the transpose of ours: the kernel w + s·a b of the merged model
    np.testing.assert_allclose(q.scale * B @ A, (q.scale * np.asarray(q.a) @ np.asarray(q.b)).T, rtol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_llama_round_trip_is_exact_and_gives_the_same_logits(tiny, tmp_path, dora):
    tree = adapted(tiny["params"], dora=dora)
    peft_format.export_peft(tmp_path, tree, tiny["config"], rslora=True)
    back = peft_format.import_peft(tmp_path, tiny["params"], tiny["config"])
    assert jax.tree.structure(back, is_leaf=lora_jax.is_lora) == jax.tree.structure(tree, is_leaf=lora_jax.is_lora)
    for x, y in zip(jax.tree.leaves(back, is_leaf=lora_jax.is_lora), jax.tree.leaves(tree, is_leaf=lora_jax.is_lora)):
        if lora_jax.is_lora(x):
            assert x.scale == pytest.approx(y.scale, rel=1e-12) and x.roles == y.roles
            for f in ("w", "a", "b", "m"):
                if getattr(y, f) is None:
                    assert getattr(x, f) is None
                else:
                    np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
        else:
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(logits(tiny, back), logits(tiny, tree))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is dora


def test_peft_llama_refusals(tiny, tmp_path):
    with pytest.raises(peft_format.PeftFormatError, match="no HF module name.*LlamaForCausalLM"):
        peft_format.export_peft(tmp_path / "e", adapted(tiny["params"], targets=r"embed_tokens/embedding"), tiny["config"])
    peft_format.export_peft(tmp_path, adapted(tiny["params"]), tiny["config"])
    fewer = llama.LlamaConfig(**{**dataclasses.asdict(tiny["config"]), "num_hidden_layers": 1})
    one = {k: v for k, v in tiny["params"].items() if k != "layers_1"}
    with pytest.raises(peft_format.PeftFormatError, match="no such Linear in this LlamaForCausalLM"):
        peft_format.import_peft(tmp_path, one, fewer)
    with pytest.raises(peft_format.PeftFormatError, match="already a LoRA node"):
        peft_format.import_peft(tmp_path, adapted(tiny["params"]), tiny["config"])
    with pytest.raises(TypeError, match="no PEFT mapping"):
        peft_format.mapping_for(DIMS)


# ------------------------------------------------------------------------------------------------
# merged HF directory


@pytest.mark.parametrize("dora", [False, True])
def test_merged_hf_directory_is_the_merged_model(tiny, tmp_path, dora):
    tree = adapted(tiny["params"], dora=dora)
    lm_export.write_hf(tmp_path, tree, tiny["config"], tiny["tok"])
    from safetensors.numpy import load_file

    sd = load_file(tmp_path / "model.safetensors")
    ref = merged64(tree, tiny["config"])
    assert sorted(sd) == sorted(ref)  # tied: no lm_head.weight
    assert max(rel(sd[k], ref[k]) for k in ref) < 1e-6
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    config, params = llama.load_hf(tmp_path)
    assert config == tiny["config"]
    np.testing.assert_array_equal(logits(tiny, params), logits(tiny, lora_jax.merge(tree)))
    # and against the float64 forward of the definition's merged weights
    assert rel(logits(tiny, params), oracle_logits(ref, IDS)) < 1e-4


def test_merged_hf_tokenizer_and_bf16(tiny, tmp_path):
    tree = adapted(tiny["params"])
    lm_export.write_hf(tmp_path, tree, tiny["config"], tiny["tok"], dtype="bfloat16")
    from safetensors.numpy import load_file

    sd = load_file(tmp_path / "model.safetensors")
    assert {str(x.dtype) for x in sd.values()} == {"bfloat16"}
    ref = merged64(tree, tiny["config"])
    assert max(rel(np.asarray(sd[k], np.float64), ref[k]) for k in ref) < 2 ** -8  # bf16's rounding
    tok = llama.load_tokenizer(tmp_path)
    src = tiny["tok"]
    for s in ["the cat sat on the mat", "12 + 30 = 42 <|im_end|>", "def add(a, b):\n  return a+b"]:
        assert tok.encode(s) == src.encode(s)
    assert (tok.eos_id, tok.bos_id, tok.chat_template) == (src.eos_id, src.bos_id, src.chat_template)
    msgs = [{"role": "user", "content": "what is twelve plus thirty?"}]
    assert tok.chat_ids(msgs) == src.chat_ids(msgs)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tiny["config"].eos_token_id
    with pytest.raises(lm_export.ExportError, match="dtype 'int8'"):
        lm_export.write_hf(tmp_path / "x", tree, tiny["config"], None, dtype="int8")


# ------------------------------------------------------------------------------------------------
# GGUF


def test_gguf_f32_is_the_merged_model_with_llama_cpp_rows_and_the_source_metadata(tiny, tmp_path):
    tree = adapted(tiny["params"])
    out = lm_export.write_gguf(tmp_path / "m.gguf", tree, tiny["config"], tiny["path"])
    ref = merged64(tree, tiny["config"])
    r = gguf.GGUFReader(str(out))
    stored = {t.name: t for t in r.tensors}
    # attn_q/attn_k rows in llama.cpp's order (its converter's permute, copied in test_llama)
    q = np.asarray(stored["blk.1.attn_q.weight"].data, np.float64)
    k = np.asarray(stored["blk.0.attn_k.weight"].data, np.float64)
    assert rel(q, llama_cpp_permute(ref["model.layers.1.self_attn.q_proj.weight"], DIMS["heads"])) < 1e-6
    assert rel(k, llama_cpp_permute(ref["model.layers.0.self_attn.k_proj.weight"], DIMS["kv_heads"])) < 1e-6
    assert {t.tensor_type.name for t in r.tensors} == {"F32"}
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    src = gguf.GGUFReader(str(tiny["path"]))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "llama.rope.freq_base", "llama.block_count"):
        assert r.fields[key].contents() == src.fields[key].contents(), key
    config, params = llama.load_gguf(out)
    assert config == tiny["config"]
    merged = lora_jax.merge(tree)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(a, b)  # F32 and the row permutation's inverse: exact
    assert rel(logits(tiny, params), oracle_logits(ref, IDS)) < 1e-4
    assert llama.load_tokenizer(out).encode("the cat sat") == tiny["tok"].encode("the cat sat")


@pytest.mark.parametrize("qtype, bound", [("F16", 5e-3), ("Q8_0", 6e-2)])
def test_gguf_f16_and_q8_0_errors(tiny, tmp_path, qtype, bound):
    tree = adapted(tiny["params"])
    out = lm_export.write_gguf(tmp_path / "m.gguf", tree, tiny["config"], tiny["path"], qtype=qtype)
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert {types[n] for n in types if "norm" in n} == {"F32"}
    assert {types[n] for n in types if "norm" not in n} == {qtype}
    _, params = llama.load_gguf(out)
    ref = logits(tiny, lora_jax.merge(tree))
    err = rel(logits(tiny, params), ref)
    print(f"{qtype}: merged logits rel err {err:.2e}")
    assert 0 < err < bound
    # Q8_0: the stored blocks are gguf's own quantization of the merged rows
    if qtype == "Q8_0":
        w = llama_cpp_permute(merged64(tree, tiny["config"])["model.layers.0.self_attn.q_proj.weight"], DIMS["heads"])
        want = gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        got = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data
        assert np.mean(np.asarray(got) == want) > 0.999  # float32 merge vs float64: a rare last-bit flip


def test_gguf_refusals(tiny, tmp_path):
    tree = adapted(tiny["params"])
    with pytest.raises(lm_export.ExportError, match="source GGUF"):
        lm_export.write_gguf(tmp_path / "m.gguf", tree, tiny["config"], tmp_path)
    with pytest.raises(lm_export.ExportError, match="GGUF type 'Q4_K'"):
        lm_export.write_gguf(tmp_path / "m.gguf", tree, tiny["config"], tiny["path"], qtype="Q4_K")
    with pytest.raises(lm_export.ExportError, match="not whole Q8_0 blocks of 32"):
        lm_export._gguf_tensor("blk.0.ffn_up.weight", np.zeros((4, 40), np.float32), "Q8_0")
    with pytest.raises(lm_export.ExportError, match="not a plain array"):
        lm_export.hf_state_dict(tree, tiny["config"])
    stacked = lora_jax.stack([tree, adapted(tiny["params"], seed=2)])
    with pytest.raises(ValueError, match="stacked"):
        lm_export.write_hf(tmp_path / "s", stacked, tiny["config"], None)


# ------------------------------------------------------------------------------------------------
# train.lm --export-*


def _lm_args(model, out, *extra, method="lora"):
    return ["--model", str(model), "--method", method, "--steps", "3", "--batch-size", "4", "--train-limit", "12",
            "--eval-limit", "2", "--max-new-tokens", "4", "--eval-batch-size", "2", "--out", str(out), "--quiet",
            "--no-plot", "--lr", "1e-2", *extra]


@pytest.mark.parametrize("base", ["f32", "q4"])
def test_train_lm_exports_agree_with_each_other(tiny, tmp_path, base):
    """The PEFT adapter put back on the base, the merged HF directory and the F32 GGUF of one run
    give one model (the GGUF bit for bit the HF directory; both the merged PEFT import)."""
    from train import lm

    s = lm.main(_lm_args(tiny["path"], tmp_path / "runs", "--base", base, "--export-peft", str(tmp_path / "peft"),
                         "--export-merged", str(tmp_path / "hf"), "--export-gguf", str(tmp_path / "m.gguf")))
    assert (s["peft_dir"], s["merged_dir"], s["gguf_file"]) == (str(tmp_path / "peft"), str(tmp_path / "hf"),
                                                                  str(tmp_path / "m.gguf"))
    _, hf = llama.load_hf(tmp_path / "hf")
    _, gg = llama.load_gguf(tmp_path / "m.gguf")
    for a, b in zip(jax.tree.leaves(hf), jax.tree.leaves(gg)):
        np.testing.assert_array_equal(a, b)
    base_params = (lm_export.merged_weights(llama.load_gguf(tiny["path"], keep_quantized=True)[1]) if base == "q4"
                   else tiny["params"])
    imported = peft_format.import_peft(tmp_path / "peft", base_params, tiny["config"])
    assert rel(logits(tiny, hf), logits(tiny, imported)) < 1e-5
    assert not np.allclose(logits(tiny, hf), logits(tiny, base_params))  # training moved it


def test_train_lm_export_refusals(tiny, tmp_path):
    from train import lm
    from train.errors import ConfigError

    for argv, match in [
        (["--method", "full", "--export-peft", "x"], "--method full trains none"),
        (["--init", "pissa", "--export-peft", "x"], "offset base kernel.*or export the merged model"),
        (["--model", str(tmp_path), "--export-gguf", "x.gguf"], "is not a .gguf"),
        (["--gguf-type", "Q8_0"], "--gguf-type is the type of --export-gguf"),
        (["--export-dtype", "bfloat16"], "give --export-merged"),
        (["--seeds", "0", "1", "--export-merged", "x"], "--export-merged with --lrs/--seeds"),
    ]:
        with pytest.raises(ConfigError, match=match):
            lm.parse_args(["--model", str(tiny["path"]), *argv] if "--model" not in argv else argv)


# ------------------------------------------------------------------------------------------------
# against transformers and PEFT (real SmolLM2; the peers' venv)


@pytest.mark.slow
def test_smollm2_exports_load_in_transformers_and_peft(tmp_path):
    from support import lm_export_check, peers

    if peers.peers_python() is None:
        pytest.skip("no peers venv (python -m bench.peers --setup-only)")
    res = lm_export_check.run(tmp_path)
    print(lm_export_check.report(res))
    p = res["peft_export"]
    assert p["max_rel_err"] <= 1e-4 and all(p["argmax_equal"]) and all(p["greedy_equal"])
    for k in ("merged_hf", "merged_gguf_f32"):
        assert res[k]["max_rel_err"] <= 1e-4 and all(res[k]["argmax_equal"])
    g = res["merged_gguf_f32"]["reloaded_by_train_llama"]
    assert g["max_abs_weight_diff"] == 0 and g["max_rel_logit_err"] == 0
    assert res["merged_gguf_q8_0"]["transformers_vs_train_llama"] <= 1e-4
    i = res["peft_import"]
    assert i["max_rel_err"] <= 1e-4 and all(i["argmax_equal"])
    assert i["round_trip"] == {"same_keys": True, "bitwise_equal": True, "config_equal": True}


def test_qwix_lora_on_the_llama_merges_then_writes(tiny, tmp_path):
    """Qwix's LoRA on this Linen Llama (sibling ``kernel_lora_a``/``kernel_lora_b`` leaves): the
    writers refuse the factors unmerged, and with ``pairs=`` write the model Qwix runs."""
    qwix = pytest.importorskip("qwix")
    provider = qwix.LoraProvider(module_path=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                 rank=4, alpha=8.0)
    qmodel = qwix.quantize_model(tiny["model"], provider)
    ids = jnp.asarray([IDS])
    init = qmodel.init(jax.random.key(0), ids)["params"]
    rng = np.random.default_rng(0)

    def fill(path, x):  # our base weights; b nonzero
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("_lora_b"):
            return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
        if name.endswith("_lora_a"):
            return x
        node = tiny["params"]
        for k in path:
            node = node[str(getattr(k, "key", k))]
        return node

    params = jax.tree_util.tree_map_with_path(fill, init)
    theirs = np.asarray(qmodel.apply({"params": params}, ids)[0])
    with pytest.raises(lm_export.ExportError, match="pass pairs=dict"):
        lm_export.write_hf(tmp_path / "x", params, tiny["config"], None)
    lm_export.write_hf(tmp_path / "hf", params, tiny["config"], tiny["tok"], pairs=dict(scale=2.0))
    lm_export.write_gguf(tmp_path / "m.gguf", params, tiny["config"], tiny["path"], pairs=dict(scale=2.0))
    for loaded in (llama.load_hf(tmp_path / "hf")[1], llama.load_gguf(tmp_path / "m.gguf")[1]):
        assert rel(logits(tiny, loaded), theirs) < 1e-5
    assert not np.allclose(theirs, logits(tiny, tiny["params"]), atol=1e-3)
