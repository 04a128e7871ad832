"""`support.accelerator` (`python -m bench.accelerator`) end to end on a tiny config (every measurement and ratio reported, finite
and positive), and the pieces it compares: `optax.flatten(adamw)` on LoRA trees (with and without
`lora_pro`) gives the unflattened updates; `train.bert.attention` (`jax.nn.dot_product_attention`)
matches the materialised dropout path with dropout off; the embedding lookups' gradient
scatter-adds in float32 under bf16 compute.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lora_jax  # noqa: E402
from support import accelerator  # noqa: E402
from train import bert  # noqa: E402

CPU_MEASUREMENTS = (
    [f"step/{n}" for n in ("full", "lora", "lora_pro", "lora_pro_adamw", "lora_flat", "lora_pro_flat")]
    + [f"grad/{n}" for n in ("full", "full_frozen_embeddings", "lora")]
    + [f"opt/{n}" for n in ("adamw", "adamw_flat", "lora_pro", "lora_pro_flat", "lora_pro_adamw")]
    + [f"forward/{n}" for n in ("base", "lora_unmerged", "lora_merged")]
    + ["attention/xla", "embedding_grad/gather_then_cast", "embedding_grad/cast_then_gather"])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("accel") / "out.jsonl"
    lines = []
    # one layer, float32 (XLA:CPU compiles bf16 graphs more slowly): ~50 s of CPU, mostly compiling
    argv = ["--small", "--layers", "1", "--dtype", "float32", "--rounds", "3", "--warmup", "1",
            "--torch-full-ms", "1000", "--json", str(path)]
    returned = accelerator.main(argv, log=lines.append)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == json.loads(json.dumps(returned))
    assert sum(line.startswith("{") for line in lines) == len(written)  # the JSON lines are printed
    return written


def test_env_line(records):
    env = records[0]
    assert env["kind"] == "env"
    for key in ("device", "jax", "jaxlib", "flax", "optax", "date", "shape", "attention"):
        assert env[key], key
    assert env["shape"]["layers"] == 1 and env["shape"]["vocab"] == 1000
    assert env["attention"] == bert.attention_implementation(jnp.float32, 16, 32) == "xla"


def test_every_measurement_finite_and_positive(records):
    got = {f"{r['kind']}/{r['name']}": r for r in records if r["kind"] not in ("env", "ratio")}
    assert set(CPU_MEASUREMENTS) <= set(got), set(CPU_MEASUREMENTS) - set(got)
    for key in CPU_MEASUREMENTS:
        r = got[key]
        assert "skipped" not in r, (key, r)
        for field in ("ms", "ms_min", "compile_s", "lower_s"):
            assert math.isfinite(r[field]) and r[field] > 0, (key, field, r[field])
        assert r["rounds"] == 3
        assert r["argument_bytes"] > 0 and r["temp_bytes"] >= 0, (key, r)
    assert got["attention/xla"]["rel_max_diff_vs_xla"] == 0.0


def test_a_failing_function_is_skipped_and_the_rest_run():
    def broken(x):
        raise NotImplementedError("no kernel for this")

    cases = [accelerator.Case("opt", "broken", broken, (jnp.ones(3),)),
             accelerator.Case("opt", "fine", lambda x: x * 2, (jnp.ones(3),))]
    args = accelerator.parse_args(["--rounds", "4", "--warmup", "1"])
    accelerator.run(cases, args, start=time.perf_counter(), log=lambda *_: None)
    assert cases[0].skipped.startswith("failed: NotImplementedError: no kernel")
    assert cases[1].skipped is None and len(cases[1].times) == 4
    assert accelerator.case_record(cases[0])["skipped"].startswith("failed")


def test_ratios(records):
    ratios = {r["name"]: r for r in records if r["kind"] == "ratio"}
    for name, _, _, goal in accelerator.GOALS:
        r = ratios[name]
        assert r["goal"] == goal and isinstance(r["pass"], bool)
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    cpu_info = [n for n, num, den in accelerator.INFO if "cudnn" not in num + den]
    for name in cpu_info:
        assert math.isfinite(ratios[name]["value"]) and ratios[name]["value"] > 0, name
    torch = ratios["full step/torch full step"]
    assert torch["goal"] == 1.0 and 0 < torch["value"] < 1  # a tiny step is faster than 1 s


# ---------------------------------------------------------------------------------------------
# the pieces


def _small_lora():
    cfg = bert.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=16)
    model, variables = bert.init_classifier(cfg, 2, jax.random.key(0), dtype=jnp.bfloat16)
    adapted = lora_jax.apply(variables, rank=4, alpha=8, targets=bert.LORA_TARGETS,
                             key=jax.random.key(1))
    return model, variables, lora_jax.split(adapted, trainable="head")


@pytest.mark.parametrize("pro", [False, True])
def test_flattened_adamw_matches_on_lora_trees(pro):
    _, _, (trainable, _) = _small_lora()
    assert any(lora_jax.is_lora(x) and x.w is None
               for x in jax.tree.leaves(trainable, is_leaf=lora_jax.is_lora))
    grads = accelerator.fake_grads(trainable)
    grads = jax.tree.map(lambda g: 1e3 * g, grads)
    pre = [lora_jax.lora_pro()] if pro else []
    plain = optax.chain(*pre, optax.adamw(1e-2))
    flat = optax.chain(*pre, optax.flatten(optax.adamw(1e-2)))
    (p1, s1), (p2, s2) = (trainable, plain.init(trainable)), (trainable, flat.init(trainable))
    for _ in range(3):
        u1, s1 = plain.update(grads, s1, p1)
        u2, s2 = flat.update(grads, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dot_product_attention_matches_materialised_path():
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(2, 6, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)

    class Ref(nn.Module):
        @nn.compact
        def __call__(self):
            return bert.attention_with_dropout(q, k, v, mask, nn.Dropout(0.5), deterministic=True)

    ref = Ref().apply({})
    for impl in (None, "xla"):
        np.testing.assert_allclose(bert.attention(q, k, v, mask, implementation=impl), ref,
                                   rtol=1e-5, atol=1e-6)
    # padded keys get no weight: changing them changes nothing
    v2 = v.at[0, 4:].set(100.0)
    np.testing.assert_allclose(bert.attention(q, k, v2, mask), bert.attention(q, k, v, mask),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        bert.attention(q, k, v, mask, implementation="flash")


def test_embedding_gradient_scatters_in_float32():
    model, variables, _ = _small_lora()
    ids = jnp.ones((2, 8), jnp.int32)
    text = str(jax.make_jaxpr(jax.grad(lambda p: model.apply(p, ids).sum()))(variables))
    outputs = [line.split("=")[0].strip() for line in text.splitlines() if "= scatter-add[" in line]
    assert len(outputs) == 3, outputs  # word, position and token-type tables
    assert all(":f32[" in out for out in outputs), outputs
