"""The README's main command, ``python -m train.demo``, end to end at a small size.

A fresh process, as a user runs it: the demo's table comes out, and nothing from TensorFlow's
start-up (the data pipeline imports TF) comes before it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_classify import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TF_NOISE = ("oneDNN", "absl::InitializeLog", "cuda_", "TensorFlow binary is optimized")


def run_demo(tmp_path, *flags):
    cmd = [sys.executable, "-m", "train.demo", "--steps", "3", "--batch-size", "4", "--max-len", "16",
           "--eval-limit", "16", "--out", str(tmp_path / "runs"), "--quiet", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_table(proc):
    rows = {m: re.search(rf"^{m}\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s*$", proc.stdout, re.M)
            for m in ("lora", "lora-pro")}
    assert all(rows.values()), proc.stdout
    for m in rows.values():
        assert int(m.group(1).replace(",", "")) > 0 and 0.0 <= float(m.group(2)) <= 1.0
    noise = [n for n in TF_NOISE if n in proc.stdout + proc.stderr]
    assert not noise, f"TensorFlow start-up lines leaked: {noise}\n{proc.stderr[-2000:]}"


def test_demo_runs_and_prints_its_table(tmp_path):
    check_table(run_demo(tmp_path, "--model", str(make_tiny_model(tmp_path / "model"))))


@pytest.mark.slow  # the real all-MiniLM-L6-v2, as the README runs it (fewer steps)
def test_demo_on_minilm(tmp_path):
    check_table(run_demo(tmp_path))
