"""train.peft_format: PEFT adapter directories, both ways.

Without torch: names, shapes and config of what is written, exact round trips (ranks and alphas
differing per module, rsLoRA), refusals. With the peers' venv (bench/peers.py; skipped without):
an adapter trained by ``train.classify --export-peft`` loads with ``peft.PeftModel.from_pretrained``
onto transformers' ``BertForSequenceClassification`` and gives our logits; an adapter trained and
saved by PEFT, imported here, gives PEFT's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from support import peers
from train import bert, peft_format

PY = peers.peers_python()
needs_peers = pytest.mark.skipif(PY is None, reason="no peers venv (python -m bench.peers --setup-only)")

TINY = bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)


def tiny_tree(**apply_kw):
    model, variables = bert.init_classifier(TINY, 3, jax.random.key(0), pooling="pooler")
    params = variables["params"]
    adapted = lora_jax.apply(params, apply_kw.pop("rank", 4), alpha=apply_kw.pop("alpha", 8.0),
                             targets=bert.LORA_TARGETS, key=jax.random.key(1), **apply_kw)
    leaves, tdef = jax.tree_util.tree_flatten(adapted, is_leaf=lora_jax.is_lora)
    ks = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [lora_jax.LoRA(w=n.w, a=n.a, b=0.1 * jax.random.normal(k, n.b.shape), scale=n.scale,
                            roles=n.roles, dropout=n.dropout,
                            m=None if n.m is None else n.m * (1 + 0.1 * jax.random.normal(k, n.m.shape)))
              if lora_jax.is_lora(n) else n for n, k in zip(leaves, ks)]
    return model, params, jax.tree_util.tree_unflatten(tdef, leaves)


def nodes(tree):
    return {jax.tree_util.keystr(p): n for p, n in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=lora_jax.is_lora)[0] if lora_jax.is_lora(n)}


def assert_same_adapters(got, want):
    g, w = nodes(got), nodes(want)
    assert sorted(g) == sorted(w)
    for k in w:
        assert g[k].scale == w[k].scale and g[k].roles == w[k].roles and g[k].dropout == w[k].dropout, k
        np.testing.assert_array_equal(np.asarray(g[k].a), np.asarray(w[k].a), err_msg=k)
        np.testing.assert_array_equal(np.asarray(g[k].b), np.asarray(w[k].b), err_msg=k)
        np.testing.assert_array_equal(np.asarray(g[k].w), np.asarray(w[k].w), err_msg=k)
        assert (g[k].m is None) == (w[k].m is None), k
        if w[k].m is not None:
            np.testing.assert_array_equal(np.asarray(g[k].m), np.asarray(w[k].m), err_msg=k)
    np.testing.assert_array_equal(np.asarray(got["head"]["kernel"]), np.asarray(want["head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(got["head"]["bias"]), np.asarray(want["head"]["bias"]))


def test_written_names_shapes_and_config(tmp_path):
    from safetensors.numpy import load_file

    _, params, adapted = tiny_tree()
    peft_format.export_peft(tmp_path, adapted, TINY)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    assert cfg["modules_to_save"] == ["classifier"] and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert len(cfg["target_modules"]) == 12 and "bert.encoder.layer.1.output.dense" in cfg["target_modules"]
    q = "base_model.model.bert.encoder.layer.0.attention.self.query"
    node = adapted["encoder"]["layer_0"]["query"]["kernel"]
    assert t[q + ".lora_A.weight"].shape == (4, 32)  # (r, in)
    np.testing.assert_array_equal(t[q + ".lora_A.weight"], np.asarray(node.a).T)
    np.testing.assert_array_equal(t[q + ".lora_B.weight"], np.asarray(node.b).T)
    assert t["base_model.model.bert.encoder.layer.0.intermediate.dense.lora_B.weight"].shape == (64, 4)  # (out, r)
    assert t["base_model.model.bert.encoder.layer.0.output.dense.lora_A.weight"].shape == (4, 64)
    assert t["base_model.model.classifier.weight"].shape == (3, 32)
    np.testing.assert_array_equal(t["base_model.model.classifier.weight"], np.asarray(params["head"]["kernel"]).T)
    assert len(t) == 12 * 2 + 2


def test_dora_writes_use_dora_and_magnitudes_and_round_trips_exactly(tmp_path):
    from safetensors.numpy import load_file

    model, params, adapted = tiny_tree(dora=True)
    peft_format.export_peft(tmp_path, adapted, TINY)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert cfg["use_dora"] is True and len(t) == 12 * 3 + 2
    q = "base_model.model.bert.encoder.layer.0.intermediate.dense.lora_magnitude_vector"
    np.testing.assert_array_equal(t[q], np.asarray(adapted["encoder"]["layer_0"]["intermediate"]["kernel"].m))
    assert t[q].shape == (64,)  # one per output unit
    back = peft_format.import_peft(tmp_path, params, TINY)
    assert_same_adapters(back, adapted)
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, 30000, (2, 12)))
    f = lora_jax.wrap(model.apply)
    np.testing.assert_array_equal(np.asarray(f({"params": back}, ids)), np.asarray(f({"params": adapted}, ids)))
    # a DoRA file without its magnitudes, or a LoRA file said to be DoRA, is refused by name
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(peft_format.PeftFormatError, match="use_dora is false"):
        peft_format.import_peft(tmp_path, params, TINY)
    _, _, mixed = tiny_tree()
    mixed["encoder"]["layer_0"]["query"]["kernel"] = adapted["encoder"]["layer_0"]["query"]["kernel"]
    with pytest.raises(peft_format.PeftFormatError, match="DoRA and plain LoRA"):
        peft_format.export_peft(tmp_path / "mixed", mixed, TINY)


def test_round_trip_is_exact(tmp_path):
    _, params, adapted = tiny_tree()
    peft_format.export_peft(tmp_path, adapted, TINY)
    back = peft_format.import_peft(tmp_path, params, TINY)
    assert_same_adapters(back, adapted)
    # the trainable half exports the same thing
    tr, _ = lora_jax.split(adapted, trainable="^head/")
    peft_format.export_peft(tmp_path / "half", tr, TINY)
    assert (tmp_path / "half" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "adapter_model.safetensors").read_bytes()


def test_round_trip_rank_and_alpha_patterns_and_rslora(tmp_path):
    pat = {r"layer_1/value": 2, r"layer_0/intermediate": 6}
    _, params, adapted = tiny_tree(rank_pattern=pat, alpha_pattern={r"layer_0/key": 3.0}, rslora=True)
    peft_format.export_peft(tmp_path, adapted, TINY, rslora=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4
    assert cfg["rank_pattern"] == {"bert.encoder.layer.1.attention.self.value": 2,
                                   "bert.encoder.layer.0.intermediate.dense": 6}
    assert set(cfg["alpha_pattern"]) == {"bert.encoder.layer.0.attention.self.key"}
    back = peft_format.import_peft(tmp_path, params, TINY)
    g, w = nodes(back), nodes(adapted)
    for k in w:
        np.testing.assert_array_equal(np.asarray(g[k].a), np.asarray(w[k].a))
        assert g[k].scale == pytest.approx(w[k].scale, rel=1e-15), k  # alpha·√r/√r: one rounding at most


def test_logits_after_import_equal_the_adapted_model(tmp_path):
    model, params, adapted = tiny_tree()
    peft_format.export_peft(tmp_path, adapted, TINY)
    back = peft_format.import_peft(tmp_path, {"params": params}, TINY)
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, 30000, (2, 12)))
    f = lora_jax.wrap(model.apply)
    np.testing.assert_array_equal(np.asarray(f(back, ids)), np.asarray(f({"params": adapted}, ids)))


def test_refusals(tmp_path):
    _, params, adapted = tiny_tree()
    with pytest.raises(peft_format.PeftFormatError, match="no LoRA node"):
        peft_format.export_peft(tmp_path / "x", params, TINY)
    peft_format.export_peft(tmp_path, adapted, TINY)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(peft_format.PeftFormatError, match="needs lora_A and lora_B and lora_magnitude_vector"):
        peft_format.import_peft(tmp_path, params, TINY)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    no_pooler = {"encoder": {k: v for k, v in params["encoder"].items() if k != "pooler"}, "head": params["head"]}
    peft_format.import_peft(tmp_path, no_pooler, TINY)  # no pooler adapter: fine without a pooler
    other = bert.BertConfig(**{**TINY.__dict__, "num_hidden_layers": 1})
    _, p1 = bert.init_classifier(other, 3, jax.random.key(0), pooling="pooler")
    with pytest.raises(peft_format.PeftFormatError, match="no such Linear"):
        peft_format.import_peft(tmp_path, p1["params"], other)


def test_classify_refuses_export_for_full_probe_and_dora_with_dropout():
    from train.classify import ConfigError, parse_args

    for method in ("full", "probe"):
        with pytest.raises(ConfigError, match="--export-peft"):
            parse_args(["--method", method, "--export-peft", "/tmp/x"])
    assert parse_args(["--method", "lora-pro", "--export-peft", "/tmp/x"]).export_peft == "/tmp/x"
    assert parse_args(["--method", "dora", "--export-peft", "/tmp/x"]).export_peft == "/tmp/x"
    with pytest.raises(ConfigError, match="--lora-dropout 0 to export"):
        parse_args(["--method", "dora", "--lora-dropout", "0.1", "--export-peft", "/tmp/x"])


# ------------------------------------------------------------------------------------------------
# against PEFT itself


def tiny_hf_dir(path: Path) -> Path:
    """test_classify's tiny random BERT, plus HF pooler weights (for pooling="pooler")."""
    from safetensors.numpy import load_file, save_file
    from test_classify import make_tiny_model

    make_tiny_model(path)
    sd = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(1)
    sd["pooler.dense.weight"] = (0.2 * rng.standard_normal((32, 32))).astype(np.float32)
    sd["pooler.dense.bias"] = (0.05 * rng.standard_normal(32)).astype(np.float32)
    save_file(sd, str(path / "model.safetensors"))
    return path


def _classify_export_check(model_dir: Path, out: Path, extra=(), tol=1e-4):
    from train import classify

    peft_dir = out / "peft"
    classify.main(["--model", str(model_dir), "--method", "lora", "--pooling", "pooler", "--steps", "6",
                   "--batch-size", "8", "--max-len", "32", "--train-limit", "64", "--eval-limit", "16",
                   "--eval-every", "6", "--ckpt-every", "0", "--out", str(out), "--quiet", "--no-plot",
                   "--lr", "1e-2", "--export-peft", str(peft_dir), *extra])
    config, enc = bert.load_hf_safetensors(model_dir, with_pooler=True)
    model, variables = bert.init_classifier(config, 2, jax.random.key(0), enc, pooling="pooler")
    ours = peft_format.import_peft(peft_dir, variables, config)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (4, 24)).astype(np.int32)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    mask[1, 18:] = 0  # padding too
    np.savez(out / "inputs.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    res = out / "logits.npz"
    peers.run_worker({"job": "forward", "model_dir": str(model_dir), "num_labels": 2, "peft_dir": str(peft_dir),
                      "inputs": str(out / "inputs.npz"), "out": str(res)}, out, PY)
    z = np.load(res)
    got = np.asarray(lora_jax.wrap(model.apply)(ours, jnp.asarray(ids), jnp.asarray(mask)))
    base = np.asarray(model.apply(variables, jnp.asarray(ids), jnp.asarray(mask)))
    err = {k: float(np.abs(got - z[k]).max() / np.abs(z[k]).max()) for k in ("unmerged", "merged")}
    assert np.abs(got - base).max() > 1e-3, "training must have moved the logits"
    print(f"\n[figure] train.classify --export-peft loaded by peft.PeftModel.from_pretrained, logits max relative "
          f"error: {err}")
    assert max(err.values()) <= tol, err
    return err


@needs_peers
def test_classify_export_loads_in_peft_with_same_logits(tmp_path):
    _classify_export_check(tiny_hf_dir(tmp_path / "model"), tmp_path / "run")


@needs_peers
def test_classify_dora_export_loads_in_peft_with_same_logits(tmp_path):
    _classify_export_check(tiny_hf_dir(tmp_path / "model"), tmp_path / "run", extra=("--method", "dora"))


@needs_peers
def test_peft_trained_adapter_imports_with_peft_logits(tmp_path):
    case = peers.make_case("tiny", tmp_path / "case", batch=4, seq=16, b_scale=0.0, num_labels=3)
    save = tmp_path / "peft_saved"
    spec = peers.worker_spec(case, "peft_train_save", tmp_path / "peft_logits.npz", lr=1e-2, steps=3,
                             save_dir=str(save), seed=3, adapter=None)
    peers.run_worker(spec, tmp_path, PY)
    theirs = np.load(tmp_path / "peft_logits.npz")["logits"]
    ours_tree = peft_format.import_peft(save, case.params, case.config)
    b = peers.jax_batch(case)
    ours = lora_jax.wrap(case.model.apply)({"params": ours_tree}, b["input_ids"], b["attention_mask"],
                                           b["token_type_ids"])
    base = case.model.apply({"params": case.params}, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert np.abs(np.asarray(base) - theirs).max() > 1e-3  # PEFT's training changed something
    err = float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())
    print(f"\n[figure] PEFT-trained adapter imported: logits max relative error vs PEFT {err:.2e}")
    assert err <= 1e-5, err
    # and back out: our export of what we imported holds PEFT's tensors exactly
    from safetensors.numpy import load_file

    peft_format.export_peft(tmp_path / "again", ours_tree, case.config)
    a, b2 = load_file(str(save / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b2)
    for k in a:
        np.testing.assert_array_equal(a[k], b2[k], err_msg=k)


@pytest.mark.slow
@needs_peers
def test_minilm_classify_export_loads_in_peft(tmp_path):
    from train import assets

    print(_classify_export_check(assets.minilm_dir(), tmp_path / "run"))


def test_hf_state_dict_refuses_lora_nodes_and_inverts_the_loader(tmp_path):
    from safetensors.numpy import save_file

    _, params, adapted = tiny_tree()
    with pytest.raises(peft_format.PeftFormatError, match="merge"):
        peft_format.hf_state_dict(adapted, TINY)
    sd = peft_format.hf_state_dict(params, TINY)
    assert sd["bert.encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)  # (out, in)
    assert sd["classifier.weight"].shape == (3, 32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(peft_format.hf_config_dict(TINY)))
    _, back = bert.load_hf_safetensors(tmp_path, with_pooler=True)  # the "bert." prefix is stripped
    for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(params["encoder"]), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))
