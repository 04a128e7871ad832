"""Multi-run experiments: each run one ``python -m train.<task>`` process, skipped when its
``summary.json`` exists; summaries read back from the run directories; Markdown sections of
bench/RESULTS.md replaced in place (`bench.sweep`, `bench.lm_sweep`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def train_run(task: str, out: Path, name: str, args: list[str], dry: bool = False,
              resume: bool = False) -> dict | None:
    """One ``python -m train.<task>`` run named `name` under `out` (skipped when its summary.json
    exists; `resume`: continued from its checkpoint, else started afresh); returns its summary
    (None when it failed or `dry`), with ``run_wall_s`` added for a run made here (a resumed run:
    this process's part)."""
    summary = out / name / "summary.json"
    if summary.is_file():
        print(f"[{name}] done already", flush=True)
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", f"train.{task}", "--out", str(out), "--name", name,
           "--resume" if resume else "--overwrite", *args]
    print(f"[{name}] {time.strftime('%H:%M:%S')} {' '.join(cmd[1:])}", flush=True)
    if dry:
        return None
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - t0
    print(f"[{name}] exit {rc} after {wall:.0f} s", flush=True)
    if rc != 0 or not summary.is_file():
        return None
    s = json.loads(summary.read_text())
    s["run_wall_s"] = wall
    summary.write_text(json.dumps(s, indent=1))
    return s


def load_runs(out: Path) -> list[dict]:
    """Every run's summary under `out`, with its directory name as ``name``."""
    runs = []
    for f in sorted(Path(out).glob("*/summary.json")):
        s = json.loads(f.read_text())
        s["name"] = f.parent.name
        runs.append(s)
    return runs


def mean_std(xs, fmt: str = "{:.4f}") -> str:
    """``mean ± sample std`` of the values that are not None ("n/a" if none; one value alone)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(np.std(xs, ddof=1))}"


def write_section(path: Path, section: str, text: str) -> None:
    """Replace (or append) the section headed `section` of a Markdown file, leaving every other
    section as it is."""
    old = path.read_text() if path.is_file() else "# Results\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        m = re.compile(r"^## ", re.M).search(old, start + len(section))
        end = m.start() if m else len(old)
        tail = old[end:]
        new = old[:start] + text.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
