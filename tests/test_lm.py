"""train.arith (the arithmetic task and its metric) and train.lm (instruction tuning) on the tiny
random Llama of test_llama, written as a real GGUF file (its tiny BPE and ChatML template)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from helpers import run_until  # noqa: E402
from train import arith  # noqa: E402

# ------------------------------------------------------------------------------------------ the task


def test_generator_is_deterministic():
    a = arith.problems("train", 200, seed=0)
    assert a == arith.problems("train", 200, seed=0)
    assert [p.question for p in a] != [p.question for p in arith.problems("train", 200, seed=1)]
    # a longer draw extends a shorter one: the held-out set does not depend on its size
    assert arith.problems("test", 100) == arith.problems("test", 300)[:100]
    assert {p.kind for p in a} == {"add", "sub", "mul", "add_sub", "mul_add", "mul_sub", "add_mul"}


def test_splits_are_disjoint():
    train = arith.problems("train", 3000)
    test = arith.problems("test", 600)
    qt, qe = {p.question for p in train}, {p.question for p in test}
    assert len(qt) == 3000 and len(qe) == 600  # distinct within each split
    assert not qt & qe
    assert all(arith.split_of(q) == "train" for q in qt) and all(arith.split_of(q) == "test" for q in qe)
    # the held-out share of the stream is about 1/5
    stream = [arith.split_of(p.question) for p, _ in zip(arith.problem_stream(0), range(2000))]
    assert 0.15 < stream.count("test") / len(stream) < 0.25


_EQ = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")


def test_answers_are_correct():
    """Recompute every answer from the worked equations, whose first operands are the question's."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for p in arith.problems("train", 1000) + arith.problems("test", 300):
        eqs = _EQ.findall(p.solution)
        assert len(eqs) == (1 if p.kind in ("add", "sub", "mul") else 2), p
        assert _EQ.sub("", p.solution).strip() == "", p.solution
        q_nums = [int(x) for x in re.findall(r"\d+", p.question)]
        eqs = [tuple(int(x) if x.isdigit() else x for x in e) for e in eqs]
        for a, op, b, c in eqs:
            assert ops[op](a, b) == c, p
        # the question's numbers are exactly the fresh operands; a second step starts from the first's result
        fresh = [eqs[0][0], eqs[0][2]] + [e[2] for e in eqs[1:]]
        assert sorted(q_nums) == sorted(fresh), p
        assert all(e[0] == prev[3] for prev, e in zip(eqs, eqs[1:])), p
        assert eqs[-1][3] == p.answer and p.answer >= 0 and isinstance(p.answer, int)
        assert p.target == f"{p.solution} The answer is {p.answer}."
        assert arith.is_correct(p.target, p.answer)


@pytest.mark.parametrize("text, want", [
    ("The answer is 42.", 42),
    ("4 * 7 = 28. 28 + 5 = 33. The answer is 33.", 33),
    ("12 + 30 = 32.", 32),  # no "answer is": the last number
    ("The answer is 1,234.", 1234),
    ("the answer is: 7", 7),
    ("The answer is $15", 15),
    ("I think the answer is 5, no wait, the answer is 6.", 6),  # the last "answer is"
    ("The answer is -3.", -3),
    ("That makes 40.0 apples", 40),
    ("Half of 5 is 2.5", None),  # not an integer
    ("I cannot tell.", None),
    ("", None),
    ("The answer is 10. Also 12 + 1 = 13", 10),  # "answer is" wins over a later number
    ("Mia has 27 cookies now", 27),
])
def test_parse_answer(text, want):
    assert arith.parse_answer(text) == want


def test_is_correct():
    assert arith.is_correct("3 + 4 = 7. The answer is 7.", 7)
    assert not arith.is_correct("3 + 4 = 7. The answer is 8.", 7)
    assert not arith.is_correct("no number", 0)


# ------------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_llama import train_tiny_bpe, write_tiny_gguf

    path = tmp_path_factory.mktemp("tiny_lm") / "tiny.gguf"
    write_tiny_gguf(path, train_tiny_bpe())
    return path


def test_prompt_masking_masks_exactly_the_prompt(tiny_gguf):
    from train import llama

    tok = llama.load_tokenizer(tiny_gguf)
    probs = arith.problems("train", 12)
    d = arith.encode(tok, probs)
    end = arith.end_of_turn_id(tok)
    for r, p in enumerate(probs):
        prompt = tok.chat_ids([{"role": "user", "content": p.question}])
        n = int(d["attention_mask"][r].sum())
        assert d["prompt_len"][r] == len(prompt)
        assert list(d["input_ids"][r, :len(prompt)]) == prompt
        loss_pos = np.flatnonzero(d["loss_mask"][r])
        assert list(loss_pos) == list(range(len(prompt), n))  # every token after the prompt, no other
        assert tok.decode(d["input_ids"][r, loss_pos]) == p.target + "<|im_end|>"
        assert d["input_ids"][r, n - 1] == end
        # the whole example is the chat template's rendering of the two turns (up to its last "\n")
        full = tok.chat_ids([{"role": "user", "content": p.question}, {"role": "assistant", "content": p.target}],
                            add_generation_prompt=False)
        assert full[:n] == list(d["input_ids"][r, :n])
        assert not d["attention_mask"][r, n:].any() and not d["loss_mask"][r, n:].any()


def test_answer_loss_ignores_the_prompt(tiny_gguf):
    """Changing prompt-only labels leaves the loss unchanged; changing an answer token does not."""
    import jax
    import jax.numpy as jnp

    from train import llama, lm

    tok = llama.load_tokenizer(tiny_gguf)
    d = arith.encode(tok, arith.problems("train", 2))
    logits = jax.random.normal(jax.random.key(0), d["input_ids"].shape + (tok.vocab_size,))
    batch = {k: jnp.asarray(d[k]) for k in ("input_ids", "loss_mask")}
    base, n = lm.answer_loss(logits, batch)
    assert int(n) == int(d["loss_mask"][:, 1:].sum())
    ids = d["input_ids"].copy()
    ids[:, 1:int(d["prompt_len"].min())] = 5  # labels of prompt positions
    other, _ = lm.answer_loss(logits, dict(batch, input_ids=jnp.asarray(ids)))
    assert float(other) == float(base)
    ids = d["input_ids"].copy()
    ids[0, d["prompt_len"][0] + 1] = (ids[0, d["prompt_len"][0] + 1] + 1) % tok.vocab_size
    assert float(lm.answer_loss(logits, dict(batch, input_ids=jnp.asarray(ids)))[0]) != float(base)


def test_heldout_loss_per_example_matches_each_problem_alone(tiny_gguf):
    """`heldout_loss` over 5 problems in batches of 2 (the last one padded): each problem's own mean
    equals that problem scored alone, and the overall mean is the token-weighted one."""
    import jax
    import jax.numpy as jnp

    from train import llama, lm

    config, params = llama.load(tiny_gguf)
    tok = llama.load_tokenizer(tiny_gguf)
    model = llama.Llama(config)
    d = arith.encode(tok, arith.problems("test", 5))

    @jax.jit
    def eval_step(p, batch):
        return lm.answer_loss(model.apply({"params": p}, batch["input_ids"], batch["attention_mask"]), batch,
                              per_example=True)

    mean, each = lm.heldout_loss(eval_step, params, d, batch_size=2)
    assert each.shape == (5,)
    alone = []
    for i in range(5):
        row = {k: jnp.asarray(d[k][i:i + 1]) for k in ("input_ids", "attention_mask", "loss_mask")}
        t, c = lm.answer_loss(model.apply({"params": params}, row["input_ids"], row["attention_mask"]), row)
        alone.append((float(t), float(c)))
    np.testing.assert_allclose(each, [t / c for t, c in alone], rtol=2e-5)
    np.testing.assert_allclose(mean, sum(t for t, _ in alone) / sum(c for _, c in alone), rtol=2e-5)


STEPS = 6


def _args(model, out, *extra, method="lora", steps=STEPS):
    return ["--model", str(model), "--method", method, "--steps", str(steps), "--batch-size", "4",
            "--train-limit", "24", "--eval-limit", "4", "--eval-every", "3", "--ckpt-every", "2",
            "--max-new-tokens", "6", "--eval-batch-size", "4", "--out", str(out), "--quiet", "--no-plot",
            "--lr", "1e-2", *extra]


@pytest.mark.parametrize("method", ["lora", "lora-pro", "dora", pytest.param("lora-pro-adamw", marks=pytest.mark.slow),
                                    pytest.param("full", marks=pytest.mark.slow)])
def test_lm_trains(tiny_gguf, tmp_path, method):
    import json

    from train import lm
    from train.loop import read_metrics

    s = lm.main(_args(tiny_gguf, tmp_path, "--eval-base", "--val-limit", "3", method=method))
    run = Path(s["run_dir"])
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert [r["step"] for r in recs if "eval_acc" in r] == [3, 6]
    losses = [r["loss"] for r in recs]
    assert all(np.isfinite(losses)) and min(losses[2:]) < losses[0]  # it learns (lr 1e-2)
    assert 0 <= s["eval_acc"] <= 1 and 0 <= s["base_eval_acc"] <= 1
    assert 0 <= s["val_acc"] <= 1 and np.isfinite(s["val_loss"]) and s["val_examples"] == 3
    assert s["eval_loss"] < s["base_eval_loss"]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all({"reply", "parsed", "correct", "base_reply", "answer_loss"} <= set(x)
                                     for x in samples)
    # the per-problem losses are the held-out loss's parts (token-weighted there, so only bracketed)
    each = [x["answer_loss"] for x in samples]
    assert min(each) - 1e-6 <= s["eval_loss"] <= max(each) + 1e-6
    if method != "full":
        assert s["trainable_params"] < 0.25 * s["total_params"]
    if method in ("lora", "lora-pro", "dora"):  # lora-pro-adamw keeps full-shape Adam moments per adapted weight
        assert s["checkpoint_bytes"] < s["full_model_param_bytes"]


@pytest.mark.parametrize("method", ["lora-pro", pytest.param("full", marks=pytest.mark.slow)])
def test_resume_equals_uninterrupted(tiny_gguf, tmp_path, method):
    from train import lm
    from train.loop import read_metrics

    ref = lm.main(_args(tiny_gguf, tmp_path / "a", method=method))
    part = _args(tiny_gguf, tmp_path / "b", method=method)
    run_until(lm.main, part, stop_after=5)  # checkpoints at 2 and 4; steps 5 logged, then stopped
    assert read_metrics(tmp_path / "b" / f"{method}-s0" / "metrics.jsonl")[-1]["step"] == 5
    res = lm.main(part + ["--resume"])  # from step 4
    assert res["params_sha256"] == ref["params_sha256"]  # bit-identical adapters
    a = read_metrics(tmp_path / "a" / f"{method}-s0" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / f"{method}-s0" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r.get("eval_loss") for r in b] == [r.get("eval_loss") for r in a]
    assert res["eval_acc"] == ref["eval_acc"]


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_model_lists_choices(tmp_path):
    from train.lm import ConfigError, main

    with pytest.raises(ConfigError, match=r"unknown model 'llama-huge'.*smollm2"):
        main(["--model", "llama-huge", "--out", str(tmp_path)])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"lacks \*\.safetensors, tokenizer\.json"):
        main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag, value, rule", [
    ("--lr", "-1", "> 0"), ("--lr", "nan", "> 0"), ("--rank", "0", ">= 1"), ("--steps", "0", ">= 1"),
    ("--batch-size", "0", ">= 1"), ("--eval-limit", "0", ">= 1"), ("--train-limit", "-3", ">= 1"),
    ("--max-len", "0", ">= 1"), ("--max-new-tokens", "0", ">= 1"), ("--data-seed", "-1", ">= 0"),
    ("--warmup-ratio", "2", r"in \[0, 1\]"), ("--ckpt-every", "-1", ">= 0"),
    ("--clip-norm", "-1", r">= 0 \(0: no clipping\)"), ("--clip-norm", "inf", r">= 0 \(0: no clipping\)"),
])
def test_bad_numeric_flags_are_refused_before_anything_loads(flag, value, rule, monkeypatch):
    from train import lm

    monkeypatch.setattr(lm.TASK, "resolve_model", lambda name: pytest.fail("loaded a model"))
    with pytest.raises(lm.ConfigError, match=rf"^{flag} must be {rule}, got "):
        lm.main([flag, value, "--out", "/nonexistent"])


def test_cli_bad_input_exits_2_with_a_message(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "train.lm", "--model", str(tmp_path / "none.gguf"),
                           "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: unknown model") and "Traceback" not in proc.stderr


def test_unknown_method_lists_choices(capsys):
    from train.lm import main

    with pytest.raises(SystemExit):
        main(["--method", "probe"])
    err = capsys.readouterr().err
    assert "lora-pro-adamw" in err and "full" in err


def test_targets_matching_nothing_and_short_max_len(tiny_gguf, tmp_path):
    from train.lm import ConfigError, main

    with pytest.raises(ConfigError, match=r"--targets 'nonexistent'.*matched no parameter"):
        main(_args(tiny_gguf, tmp_path, "--targets", "nonexistent"))
    with pytest.raises(ConfigError, match=r"--max-len 20 is shorter than the longest training example"):
        main(_args(tiny_gguf, tmp_path, "--max-len", "20"))
    assert not (tmp_path / "lora-s0" / "metrics.jsonl").exists()


def test_existing_run_dir_needs_resume_or_overwrite(tiny_gguf, tmp_path):
    from train.lm import ConfigError, main

    main(_args(tiny_gguf, tmp_path))  # STEPS: the compiled steps of the runs above serve
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        main(_args(tiny_gguf, tmp_path))


def test_lm_trains_on_a_quantized_base(tiny_gguf, tmp_path):
    """--base q4 (QLoRA): the tiny GGUF's Q8_0/Q4_1 tensors stay quantized; it trains to a finite loss,
    the frozen half is smaller than the float32 run's and both summaries report the step's memory."""
    from train import lm
    from train.loop import read_metrics

    q = lm.main(_args(tiny_gguf, tmp_path / "q", "--base", "q4", "--eval-base", "--val-limit", "4", steps=3))
    f = lm.main(_args(tiny_gguf, tmp_path / "f"))  # test_lm_trains[lora]'s compiled step
    losses = [r["loss"] for r in read_metrics(Path(q["run_dir"]) / "metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses)) and np.isfinite(q["eval_loss"])
    assert q["base"] == "q4" and f["base"] == "f32" and 0 <= q["val_acc"] <= 1 and q["val_examples"] == 4
    assert q["total_params"] == f["total_params"] and q["trainable_params"] == f["trainable_params"]
    assert q["frozen_param_bytes"] < f["frozen_param_bytes"]
    for s in (q, f):
        assert s["step_memory_bytes"]["argument"] > 0
    assert q["step_memory_bytes"]["argument"] < f["step_memory_bytes"]["argument"]


def test_quantized_base_refuses_full_fine_tuning(tiny_gguf, tmp_path, capsys):
    from train import lm

    assert lm.cli(_args(tiny_gguf, tmp_path, "--base", "q4", method="full")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --base q4") and "\n" not in err
