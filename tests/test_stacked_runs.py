"""``--lrs``/``--seeds``: several adapters trained as one stacked run (one process, one vmapped
step on the shared base), each with its own run directory, identical to its run alone; resumed
bit for bit; and the refusals. On the tiny random Llama of test_llama (train.lm)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gguf")

from helpers import run_until  # noqa: E402
from test_lm import _args, tiny_gguf  # noqa: E402,F401  (the fixture)
from train import lm  # noqa: E402
from train.errors import ConfigError  # noqa: E402
from train.loop import read_metrics  # noqa: E402

LRS, SEEDS = ("1e-2", "3e-3"), ("0", "1")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.mark.parametrize("method", ["lora-pro", pytest.param("lora-pro-adamw", marks=pytest.mark.slow)])
def test_stacked_run_equals_each_adapter_run_alone(tiny_gguf, tmp_path, method):
    out = tmp_path / "many"
    summaries = lm.main(_args(tiny_gguf, out, "--lrs", *LRS, "--seeds", *SEEDS, method=method))
    assert [(s["lr"], s["seed"]) for s in summaries] == [(float(lr), int(seed)) for lr in LRS for seed in SEEDS]
    assert len({s["params_sha256"] for s in summaries}) == 4  # four different adapters
    for s in summaries:
        run = out / f"{method}-lr{s['lr']:g}-s{s['seed']}"
        assert s["run_dir"] == str(run) and s["stacked_with"] == 4
        config = json.loads((run / "config.json").read_text())
        assert (config["lr"], config["seed"]) == (s["lr"], s["seed"])
        assert json.loads((run / "summary.json").read_text())["params_sha256"] == s["params_sha256"]
        alone = lm.main(_args(tiny_gguf, tmp_path / "one", "--seed", str(s["seed"]), "--name", run.name,
                              "--lr", repr(s["lr"]), method=method))
        many_recs, one_recs = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "one" / run.name / "metrics.jsonl")
        assert [r["step"] for r in many_recs] == [r["step"] for r in one_recs] == list(range(1, 7))
        assert _rel([r["loss"] for r in many_recs], [r["loss"] for r in one_recs]) <= 1e-5
        assert [r["lr"] for r in many_recs] == pytest.approx([r["lr"] for r in one_recs], rel=1e-6)
        assert _rel(s["eval_loss"], alone["eval_loss"]) <= 1e-5
        print(f"{method} lr {s['lr']:g} seed {s['seed']}: stacked vs alone losses "
              f"{_rel([r['loss'] for r in many_recs], [r['loss'] for r in one_recs]):.1e}")


def test_stacked_run_resumes_bit_for_bit(tiny_gguf, tmp_path):
    argv = _args(tiny_gguf, tmp_path / "a", "--lrs", *LRS, method="lora-pro")
    ref = lm.main(argv)
    part = _args(tiny_gguf, tmp_path / "b", "--lrs", *LRS, method="lora-pro")
    run_until(lm.main, part, stop_after=5)  # checkpoints at 2 and 4; step 5 logged, then stopped
    res = lm.main(part + ["--resume"])
    assert [s["params_sha256"] for s in res] == [s["params_sha256"] for s in ref]
    for s in res:
        name = f"lora-pro-lr{s['lr']:g}-s0"
        a, b = (read_metrics(tmp_path / d / name / "metrics.jsonl") for d in ("a", "b"))
        assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(b) == 6


@pytest.mark.parametrize("extra, match", [
    (["--method", "full"], "no frozen base"),
    (["--init", "lora-ga"], "lora-ga"),
    (["--seeds", "1", "1"], "repeats"),
    (["--lrs", "0.1", "-1"], "> 0"),
])
def test_stacked_run_refusals(extra, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        lm.main(["--out", str(tmp_path), "--lrs", "1e-3", "2e-3", *extra])
