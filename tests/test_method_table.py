"""`bench.method_table` (`support.method_table`): every method's flags are valid `train.classify`
flags, the grids are extended until the choice is inside, the gap closure and the report, on fake
runs whose scores are a known function of the learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _fake_runs(monkeypatch, peak: dict, noise: float = 0.01):
    """`support.method_table.train_run` replaced by runs scoring ``0.8 − 0.1·|log10 lr − peak|``
    (+ seed noise); the flags go through train.classify's own parser (so each is one it takes)."""
    from support import method_table
    from train import classify

    made = []

    def fake(task, out, name, args, dry=False, resume=False):
        assert task == "classify"
        f = Path(out) / name / "summary.json"
        if f.is_file():
            return json.loads(f.read_text())
        parsed = classify.parse_args(args)
        variant = name.rsplit("-lr", 1)[0]
        made.append((Path(out).name, variant, parsed.lr, parsed.seed))
        x = -abs(np.log10(parsed.lr) - peak[variant])
        rng = np.random.default_rng([parsed.seed, len(variant), len(str(out))])
        s = {"method": parsed.method, "lr": parsed.lr, "seed": parsed.seed, "val_acc": round(0.8 + 0.1 * x, 6),
             "val_loss": 0.5 - 0.1 * x, "eval_acc": 0.8 + 0.1 * x + noise * rng.normal(),
             "eval_loss": 0.5 - 0.1 * x + noise * rng.normal(), "train_loss_last10pct": 0.3, "wall_s": 60.0}
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(s))
        return s

    monkeypatch.setattr(method_table, "train_run", fake)
    return made


def test_every_method_runs_with_its_flags_and_its_grid_is_extended_to_an_inside_choice(tmp_path, monkeypatch):
    from support import lr_grid, method_table

    peak = {m: np.log10(lr_grid.lr_of(k[1])) for m, k in method_table.GRIDS.items()}  # the middle of each grid
    peak["dora"] = np.log10(lr_grid.lr_of(method_table.GRIDS["dora"][-1])) + 0.6  # past the top end
    made = _fake_runs(monkeypatch, peak)
    a = method_table.parse_args(["--out", str(tmp_path), "--datasets", "lora_jax_tweets"])
    chosen = method_table.sweep(a)["lora_jax_tweets"]
    assert set(chosen) == set(method_table.METHODS)
    for m, g in method_table.GRIDS.items():
        assert chosen[m] == (g[-1] + 1 if m == "dora" else g[1])
        seeds = sorted(s for ds, v, lr, s in made if v == m and lr == lr_grid.lr_of(chosen[m]))
        assert seeds == [0, 1, 2]
    assert len([1 for _, v, _, s in made if v == "dora" and s == 0]) == 5  # 3 + 2 extensions


def test_closure_is_the_fraction_of_the_gap_and_unresolved_gaps_print_no_fraction(tmp_path, monkeypatch):
    from support import lr_grid, method_table

    g = method_table.GRIDS
    # chosen runs at 0.8 (no noise); then lora moved to 0.751, pissa to 0.776 (seed means)
    peak = {m: np.log10(lr_grid.lr_of(k[1])) for m, k in g.items()}
    _fake_runs(monkeypatch, peak, noise=0.0)
    a = method_table.parse_args(["--out", str(tmp_path), "--datasets", "lora_jax_movie_reviews",
                                 "--methods", "full", "lora", "pissa"])
    method_table.sweep(a)
    per = method_table.collect(tmp_path / "lora_jax_movie_reviews", a.methods)
    for m, shift in (("lora", -0.05), ("pissa", -0.025)):  # move the chosen runs' held-out scores
        for r in per[m]["seeds"]:
            r["eval_acc"] += shift + 0.001 * r["seed"]
    c = method_table.closure(per, "eval_acc")
    assert c["resolved"] and c["gap"] == pytest.approx(0.05 - 0.001, abs=1e-12)
    assert c["methods"]["pissa"]["closure"] == pytest.approx(0.025 / 0.049, rel=1e-9)
    for r in per["lora"]["seeds"]:  # a gap inside the noise
        r["eval_acc"] = 0.8 + 0.05 * (r["seed"] - 1)
    assert not method_table.closure(per, "eval_acc")["resolved"]


def test_report_writes_the_json_and_only_its_section(tmp_path, monkeypatch):
    from support import method_table

    peak = {m: np.log10(1e-3) for m in method_table.METHODS}
    peak["full"] = peak["lora-pro-adamw"] = np.log10(3.16e-5)
    _fake_runs(monkeypatch, peak)
    monkeypatch.setattr(method_table, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(method_table, "ROOT", tmp_path)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "RESULTS.md").write_text("# Results\n\n## Other\n\nkept\n")
    a = method_table.parse_args(["--out", str(tmp_path / "runs")])
    method_table.sweep(a)
    text = method_table.report(a)
    js = json.loads((tmp_path / "results" / "method_table.json").read_text())
    assert set(js["datasets"]) == set(method_table.DATASETS)
    for ds in js["datasets"].values():
        assert set(ds["methods"]) == set(method_table.METHODS)
        for d in ds["methods"].values():
            assert len(d["lr_grid"]) >= 3 and d["chosen_inside"] and len(d["seeds"]) == 3
        assert set(ds["gap_closure"]) == {"eval_acc", "eval_loss"}
    md = (tmp_path / "bench" / "RESULTS.md").read_text()
    assert method_table.SECTION in md and "## Other\n\nkept" in md and text in md
    assert md.count("| LoRA-Pro full (Algorithm 2) |") == 2  # one row per dataset
