"""What `pip install .` puts into site-packages: `lora_jax` alone at the top level, the trainers
inside it as `lora_jax.train` (a bare `train` package would collide with users' own modules)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_train_inside_lora_jax(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheel, = tmp_path.glob("lora_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lora_jax"}, top
    ours = {p.name for p in (ROOT / "train").glob("*.py")}
    packed = {n.rsplit("/", 1)[1] for n in names if n.startswith("lora_jax/train/")}
    assert ours and packed == ours, (ours, packed)


def test_installed_trainers_import_as_lora_jax_train(tmp_path):
    """Outside the repository (no `train/` on the path) the trainers are `lora_jax.train.*` and no
    top-level `train` exists; their own imports are relative, so both names work in a clone."""
    code = ("import importlib.util, lora_jax.train.lm as lm, lora_jax.train.task as task\n"
            "assert lm.TASK.__class__.__module__ == 'lora_jax.train.lm'\n"
            "print('TRAIN', importlib.util.find_spec('train'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAIN None" in proc.stdout, proc.stdout
