"""Every notebook runs top to bottom in a Jupyter kernel (nbclient), as *Run all* does on Colab,
and prints the figures it is about; its plots come out as PNG outputs.

The notebooks run at their small size (``LORA_JAX_NOTEBOOK_SMALL=1``) in a temporary working
directory. Their install cell is skipped here (lora_jax is importable); the slow test runs it for
real in a fresh virtual environment against a local clone of this repository.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO_URL_LINE = re.compile(r'^REPO_URL = "([^"]+)"', re.M)
BADGE = re.compile(r"\(https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/notebooks/([\w.-]+\.ipynb)\)")
FLOAT = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def execute(path: Path, cwd: Path, *, kernel_name: str = "python3", env: dict | None = None,
            notebook=None) -> tuple[nbformat.NotebookNode, float]:
    """The executed notebook and its wall time (kernel start included)."""
    nb = notebook if notebook is not None else nbformat.read(path, as_version=4)
    env = dict(os.environ if env is None else env, LORA_JAX_NOTEBOOK_SMALL="1")
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend draws the PNGs
    client = NotebookClient(nb, timeout=900, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    client.execute(env=env)
    return nb, time.perf_counter() - t0


def stdout_of(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def pngs_of(nb) -> list[bytes]:
    out = []
    for c in nb.cells:
        if c.cell_type == "code":
            for o in c.outputs:
                data = o.get("data", {})
                if "image/png" in data:
                    out.append(base64.b64decode(data["image/png"]))
    return out


def grab(pattern: str, text: str) -> tuple[float, ...]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the notebook's output:\n{text[-3000:]}"
    return tuple(float(g) for g in m.groups())


_RUNS: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Each notebook executed once per test module, on first use."""

    def get(name: str):
        if name not in _RUNS:
            cwd = tmp_path_factory.mktemp(name.removesuffix(".ipynb"))
            _RUNS[name] = (*execute(NB_DIR / name, cwd), cwd)
            print(f"\n{name}: {_RUNS[name][1]:.1f} s, {len(pngs_of(_RUNS[name][0]))} PNG outputs")
        return _RUNS[name]

    return get


def test_there_is_a_notebook():
    assert {"quickstart.ipynb", "finetune_bert.ipynb", "lora_pro_geometry.ipynb"} <= set(NAMES)


# ------------------------------------------------------------------------------------------------
# the form every notebook shares


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_form(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # a Colab badge to itself, in the first (markdown) cell
    assert nb.cells[0].cell_type == "markdown"
    assert BADGE.findall(nb.cells[0].source) == [("lora-jax/lora_jax", path.name)]
    # the first code cell is the install cell, REPO_URL its first statement
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = code[0].source
    assert nb.cells[1] is code[0]
    statements = [line for line in first.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert REPO_URL_LINE.match(statements[0]), statements[0]
    assert "except ImportError" in first and "sys.executable" in first and "git+{REPO_URL}" in first
    # Python only (runs under any front end), outputs stripped in the repository
    for c in code:
        assert not [line for line in c.source.splitlines() if line.lstrip().startswith(("!", "%"))]
        assert c.outputs == [] and c.execution_count is None
    # size switch at the top where there is one to make
    if path.name != "quickstart.ipynb":
        assert 'SMALL = os.environ.get("LORA_JAX_NOTEBOOK_SMALL", "1") != "0"' in code[1].source


def test_one_repo_url_everywhere():
    urls = {REPO_URL_LINE.search(nbformat.read(p, as_version=4).cells[1].source).group(1) for p in NOTEBOOKS}
    assert len(urls) == 1
    url = urls.pop()
    readme = (ROOT / "README.md").read_text()
    badges = BADGE.findall(readme)
    assert {repo for repo, _ in badges} == {url.removeprefix("https://github.com/")}
    assert {nb for _, nb in badges} == set(NAMES)  # a badge for every notebook
    assert "REPO_URL" in readme


def run_install_cell(monkeypatch, name: str, *, gpu: bool = False, tpu: bool = False, pip_status: int = 0):
    """Exec a notebook's install cell as on a fresh runtime (lora_jax not importable), pip faked:
    returns the pip commands it ran."""
    import shutil

    source = nbformat.read(NB_DIR / name, as_version=4).cells[1].source
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if pip_status == 0:
            sys.modules.pop("lora_jax", None)  # "installed": the import after pip finds it
        return subprocess.CompletedProcess(cmd, pip_status, "pip's stdout", "pip's stderr")

    monkeypatch.setitem(sys.modules, "lora_jax", None)  # `import lora_jax` raises ImportError
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: "/usr/bin/nvidia-smi" if gpu and cmd == "nvidia-smi" else None)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    if tpu:
        monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5e-1")
    else:
        monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    exec(compile(source, f"{name} install cell", "exec"), {"__name__": "__main__"})
    return calls


@pytest.mark.parametrize("name, gpu, tpu, extras", [
    ("finetune_bert.ipynb", False, False, "[train]"),
    ("finetune_bert.ipynb", True, False, "[train,cuda12]"),
    ("lora_pro_geometry.ipynb", False, True, "[train,tpu]"),
    ("quickstart.ipynb", False, False, ""),
    ("quickstart.ipynb", True, False, "[cuda12]"),
])
def test_install_cell_requirement(monkeypatch, capsys, name, gpu, tpu, extras):
    if not glob_accel_absent():
        pytest.skip("this machine has /dev/accel* (a TPU host): the CPU/GPU cases do not apply")
    calls = run_install_cell(monkeypatch, name, gpu=gpu, tpu=tpu)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q",
                      f"lora_jax{extras} @ git+https://github.com/lora-jax/lora_jax"]]
    assert "lora_jax from" in capsys.readouterr().out


def test_install_cell_shows_pip_errors(monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="pip install failed"):
        run_install_cell(monkeypatch, "finetune_bert.ipynb", pip_status=1)
    out = capsys.readouterr().out
    assert "pip's stdout" in out and "pip's stderr" in out


def glob_accel_absent() -> bool:
    import glob

    return not glob.glob("/dev/accel*")


# ------------------------------------------------------------------------------------------------
# each notebook, executed


def check_install_cell_skipped(nb):
    out = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "pip install" not in out and f"lora_jax from {ROOT / 'lora_jax'}" in out, out


def test_quickstart_runs(executed):
    nb, _, _ = executed("quickstart.ipynb")
    check_install_cell_skipped(nb)
    out = stdout_of(nb)
    finals = {name: grab(rf"{re.escape(name)}\s+final loss {FLOAT}", out)[0]
              for name in ("LoRA, SGD", "LoRA-Pro, SGD", "LoRA-Pro AdamW (Algorithm 2)")}
    assert all(0 <= v < 0.05 for v in finals.values()), finals
    merge_gap = float(out.strip().splitlines()[-1])  # |merged - factored| output
    assert merge_gap < 1e-4


def test_lora_pro_geometry_runs(executed):
    nb, _, _ = executed("lora_pro_geometry.ipynb")
    check_install_cell_skipped(nb)
    out = stdout_of(nb)
    d_lora, d_best, d_pro = grab(rf"relative distance to G: LoRA {FLOAT}, LoRA best-rescaled {FLOAT}, "
                                 rf"LoRA-Pro {FLOAT}", out)
    assert d_pro <= d_best <= d_lora and d_pro < 1.0
    (residual,) = grab(rf"projection residual \(LoRA-Pro vs float64 projection\): {FLOAT}", out)
    assert residual < 1e-5
    (ratio,) = grab(rf"<G, g_pro> / \|g_pro\|\^2 = {FLOAT}", out)
    assert abs(ratio - 1) < 1e-4  # the projection's defining property
    lora_gap, pro_gap = grab(rf"\|loss - full FT loss\| at step 20: LoRA {FLOAT}, LoRA-Pro {FLOAT}", out)
    assert pro_gap < lora_gap
    pngs = pngs_of(nb)
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) and len(p) > 10_000 for p in pngs)


def test_finetune_bert_runs(executed):
    nb, _, cwd = executed("finetune_bert.ipynb")
    check_install_cell_skipped(nb)
    check_finetune_output(nb, cwd)


def check_finetune_output(nb, cwd: Path):
    out = stdout_of(nb)
    assert "SMALL=True" in out
    acc_lora, acc_pro = grab(rf"eval accuracy: lora {FLOAT}, lora-pro {FLOAT}", out)
    assert 0.65 <= acc_lora <= 1 and 0.65 <= acc_pro <= 1, out  # chance is about 0.5
    assert "checksum equals the trained parameters': True" in out
    merged, reported, gap = grab(rf"merged model: eval accuracy {FLOAT} \(the run reported {FLOAT}\); "
                                 rf"max \|factored - merged\| logit {FLOAT}", out)
    assert merged == reported == acc_pro and gap < 1e-4
    (peft_gap,) = grab(rf"PEFT round trip: max \|logit difference\| {FLOAT}", out)
    assert peft_gap < 1e-4
    run = cwd / "runs" / "finetune_bert"
    cfg = json.loads((run / "peft-lora-pro" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and (run / "peft-lora-pro" / "adapter_model.safetensors").is_file()
    assert (run / "lora-s0" / "ckpt" / "60").is_dir() and (run / "lora-pro-s0" / "ckpt" / "60").is_dir()
    pngs = pngs_of(nb)
    assert len(pngs) == 1 and pngs[0].startswith(PNG_MAGIC) and len(pngs[0]) > 10_000
    # the progress bar (tqdm, on stderr) ran to the end for both methods
    err = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "stream" and o.name == "stderr")
    assert "lora s0: 100%" in err and "lora-pro s0: 100%" in err


# ------------------------------------------------------------------------------------------------
# the install cell, for real


@pytest.mark.slow  # a fresh virtual environment: pip installs lora_jax[train] (TensorFlow and all)
def test_install_cell_in_a_fresh_venv(tmp_path, monkeypatch):
    """A new venv with only a Jupyter kernel in it (what a Colab runtime brings), REPO_URL pointed
    at a local clone of this repository: the install cell installs the package, then the notebook
    (the fine-tuning one, which needs the `train` extra) runs to the end."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # a runtime's current pip (the pip that venv bundles may predate `name @ git+file:///…` URLs) and
    # a Jupyter kernel; nothing else
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip", "ipykernel"], check=True)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(py), "-c", "import lora_jax"], cwd=tmp_path, env=clean_env, capture_output=True)
    assert probe.returncode != 0  # not importable before the install cell

    kernels = tmp_path / "jupyter" / "kernels" / "fresh-venv"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(NB_DIR / "finetune_bert.ipynb", as_version=4)
    nb.cells[1].source, n = REPO_URL_LINE.subn(f'REPO_URL = "file://{clone}"', nb.cells[1].source)
    assert n == 1
    work = tmp_path / "work"
    work.mkdir()
    nb, seconds = execute(NB_DIR / "finetune_bert.ipynb", work, kernel_name="fresh-venv", env=clean_env, notebook=nb)
    print(f"\nfresh venv: install cell + notebook {seconds:.0f} s")
    install_out = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert f"pip install lora_jax[train] @ git+file://{clone}" in install_out, install_out
    assert f"lora_jax from {venv}" in install_out, install_out  # the installed copy, not this checkout
    check_finetune_output(nb, work)
