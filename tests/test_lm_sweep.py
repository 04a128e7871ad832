"""The LM fidelity experiment's parts that can be checked without the model: the trainers'
gradient clipping (`train.optim`), `support.lm_fidelity`'s lr choice and grid extension, `support.lm_report`'s
paired intervals and report files, and `support.lm_mechanism`'s figures against float64 oracles."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from support import lr_grid
from helpers import randomize_adapters

# ------------------------------------------------------------------------------------------ clipping


def _problem(method, key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"dense": {"kernel": jax.random.normal(k1, (16, 12))}, "out": {"kernel": jax.random.normal(k2, (12, 4))}}
    if method == "full":
        return params
    tr, _ = lora_jax.split(randomize_adapters(lora_jax.apply(params, 3, alpha=6.0), k3))
    return tr


def _scaled(tree, k):
    return jax.tree.map(lambda x: x * k, tree)


@pytest.mark.parametrize("method", ["full", "lora", "lora-pro", "lora-pro-adamw"])
def test_clip_norm_clips_the_raw_gradients_before_the_method(method):
    """Two steps, a large gradient then a small one: with --clip-norm c the updates equal the
    unclipped optimizer's on (G1·c/‖G1‖, G2) and differ from its updates on (G1, G2) (Adam's second
    step sees the ratio of the two gradients, so skipped clipping would show)."""
    from train.optim import make_optimizer

    tr = _problem(method, jax.random.key(0))
    g1 = _scaled(jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), tr), 50.0)
    g2 = _scaled(jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), tr), 1e-3)
    c = 0.5
    n1, n2 = float(optax.global_norm(g1)), float(optax.global_norm(g2))
    assert n1 > c > n2
    sched = optax.constant_schedule(1e-2)

    def updates(tx, grads):
        state, out = tx.init(tr), []
        for g in grads:
            u, state = tx.update(g, state, tr)
            out.append(u)
        return out

    clipped = updates(make_optimizer(method, sched, 0.0, clip_norm=c), [g1, g2])
    by_hand = updates(make_optimizer(method, sched, 0.0), [_scaled(g1, c / n1), g2])
    unclipped = updates(make_optimizer(method, sched, 0.0), [g1, g2])
    for x, y in zip(clipped, by_hand):
        np.testing.assert_allclose(np.concatenate([np.ravel(v) for v in jax.tree.leaves(x)]),
                                   np.concatenate([np.ravel(v) for v in jax.tree.leaves(y)]), rtol=2e-4, atol=1e-9)
    second = [np.concatenate([np.ravel(v) for v in jax.tree.leaves(u[1])]) for u in (clipped, unclipped)]
    assert np.max(np.abs(second[0] - second[1])) > 1e-2 * np.max(np.abs(second[1]))


# ------------------------------------------------------------------------------------------ the sweep


def _fake_runs(tmp_path, monkeypatch, peak: dict, n_eval=40, seeds_noise=0.0):
    """`support.lm_fidelity.train_run` replaced by runs whose scores are a function of log10(lr): val
    and held-out exact match peak at `peak[method]` (a log10 lr); files as `train.lm` writes them."""
    from support import lm_fidelity as lm_sweep

    made = []

    def fake(task, out, name, args, dry=False, resume=False):
        if (Path(out) / name / "summary.json").is_file():
            return json.loads((Path(out) / name / "summary.json").read_text())
        f = dict(zip(args[::2], args[1::2]))
        method, lr, seed = f["--method"], float(f["--lr"]), int(f["--seed"])
        made.append((method, lr, seed))
        d = Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        x = -abs(np.log10(lr) - peak[method])  # 0 at the peak
        rng = np.random.default_rng([seed, len(method)])
        acc = float(np.clip(0.6 + 0.2 * x + seeds_noise * rng.normal(), 0, 1))
        correct = rng.random(n_eval) < acc
        losses = 0.1 - 0.05 * x + 0.01 * rng.random(n_eval)
        (d / "samples.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": i, "reply": "",
                                                             "correct": bool(correct[i]),
                                                             "answer_loss": float(losses[i])}) + "\n"
                                                 for i in range(n_eval)))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)))
        (d / "config.json").write_text(json.dumps({"rank": 8, "alpha": 16.0, "warmup_ratio": 0.03, "schedule": "cosine",
                                                   "weight_decay": 0.0, "clip_norm": 1.0, "train_limit": 4000}))
        s = {"method": method, "lr": lr, "seed": seed, "val_acc": round(0.6 + 0.2 * x, 6), "val_loss": 0.1 - 0.05 * x,
             "eval_acc": float(correct.mean()), "eval_loss": float(losses.mean()), "train_loss_last10pct": 0.1,
             "sec_per_step": 1.0, "steps": 10, "batch_size": 4, "eval_examples": n_eval, "val_examples": 20,
             "run_dir": str(d), **({"base_eval_acc": 0.05, "base_eval_loss": 1.2} if "--eval-base" in args else {})}
        (d / "summary.json").write_text(json.dumps(s))
        return s

    monkeypatch.setattr(lm_sweep, "train_run", fake)
    return made


def test_grid_is_extended_until_the_choice_is_inside(tmp_path, monkeypatch):
    """LoRA peaks at 10^-1.5, above its grid's top (10^-2.5): the grid grows by one half decade at
    a time until the chosen lr has a neighbour on each side (10^-1.5 between 10^-2 and 10^-1); full
    FT peaks inside its grid: no extension; then seeds 1, 2 at each chosen lr, each run once."""
    from support import lm_fidelity as lm_sweep

    made = _fake_runs(tmp_path, monkeypatch, {"lora": -1.5, "full": -4.5})
    a = lm_sweep.parse_args(["--out", str(tmp_path / "runs"), "--methods", "full", "lora"])
    chosen = lm_sweep.sweep(a)
    assert chosen == {"full": -9, "lora": -3}
    assert sorted(lr for m, lr, s in made if m == "lora" and s == 0) == [lr_grid.lr_of(k) for k in range(-8, -1)]
    assert sorted(lr for m, lr, s in made if m == "full" and s == 0) == [lr_grid.lr_of(k) for k in (-10, -9, -8, -7)]
    assert sorted((m, lr, s) for m, lr, s in made if s != 0) == [
        ("full", lr_grid.lr_of(-9), 1), ("full", lr_grid.lr_of(-9), 2),
        ("lora", lr_grid.lr_of(-3), 1), ("lora", lr_grid.lr_of(-3), 2)]
    assert len(made) == len(set(made))
    before = len(made)
    assert lm_sweep.sweep(a) == chosen and len(made) == before  # a second call finds every run done


def test_lr_grid_values_and_names():
    from support import lm_fidelity as lm_sweep

    assert [lr_grid.lr_of(k) for k in (-8, -7, -6, -5)] == [1e-4, 3.16e-4, 1e-3, 3.16e-3]
    for m, ks in lm_sweep.GRIDS.items():
        lrs = [lr_grid.lr_of(k) for k in ks]
        assert len(lrs) >= 4 and np.log10(lrs[-1] / lrs[0]) >= 1.5 - 1e-3, m
    assert lr_grid.run_name("lora", 3.16e-4, 2) == "lora-lr0.000316-s2"
    runs = {-7: {"val_acc": 0.5, "val_loss": 0.2}, -6: {"val_acc": 0.5, "val_loss": 0.1}, -5: {"val_acc": 0.4, "val_loss": 0.0}}
    assert lr_grid.choose(runs) == -6  # a tie on val_acc goes to the lower val_loss


# ------------------------------------------------------------------------------------------ the report


def test_closure_is_paired_and_exact_on_a_known_mixture():
    """A method equal to the cellwise midpoint of LoRA and full FT closes exactly half of the gap
    in every bootstrap replicate (paired draws): point value and interval 0.5; a method equal to
    LoRA: difference 0 with a zero-width interval."""
    from support.lm_report import bootstrap, closure

    rng = np.random.default_rng(0)
    lo_c, fu_c = rng.random((3, 50)), rng.random((3, 50)) + 0.5
    lo_l, fu_l = rng.random((3, 50)) + 1.0, rng.random((3, 50))
    mats = {"lora": (lo_c, lo_l), "full": (fu_c, fu_l), "lora-pro": ((lo_c + fu_c) / 2, (lo_l + fu_l) / 2),
            "lora-pro-adamw": (lo_c, lo_l)}
    res = closure(mats, bootstrap(mats, np.random.default_rng(1), n=300))
    for what in ("eval_acc", "eval_loss"):
        np.testing.assert_allclose(res[what]["lora-pro"]["closure"], 0.5, rtol=1e-12)
        np.testing.assert_allclose(res[what]["lora-pro"]["closure_ci"], [0.5, 0.5], rtol=1e-9)
        assert res[what]["lora-pro-adamw"]["minus_lora_ci"] == [0.0, 0.0]
        assert res[what]["gap_ci"][0] < res[what]["gap"] < res[what]["gap_ci"][1]
    np.testing.assert_allclose(res["eval_acc"]["gap"], fu_c.mean() - lo_c.mean())


def test_report_writes_the_json_plot_and_section(tmp_path, monkeypatch):
    from support import lm_fidelity as lm_sweep, lm_report

    _fake_runs(tmp_path, monkeypatch, {"full": -4.1, "lora": -3.05, "lora-pro": -2.95, "lora-pro-adamw": -4.4},
               seeds_noise=0.05)
    a = lm_sweep.parse_args(["--out", str(tmp_path / "runs")])
    lm_sweep.sweep(a)
    monkeypatch.setattr(lm_report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(lm_report, "ROOT", tmp_path)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "RESULTS.md").write_text("# Results\n\n## Other\n\nkept\n")
    text = lm_report.report(a)
    js = json.loads((tmp_path / "results" / "lm_sweep.json").read_text())
    assert set(js["methods"]) == {"full", "lora", "lora-pro", "lora-pro-adamw"}
    assert js["n_eval"] == 40 and js["steps"] == 10 and js["batch_size"] == 4
    for m, d in js["methods"].items():
        assert len(d["lr_grid"]) >= 4 and d["lr_grid"][0] < d["chosen_lr"] < d["lr_grid"][-1]
        assert [s["seed"] for s in d["seeds"]] == [0, 1, 2]
        assert {"seed", "eval_acc", "eval_loss", "train_loss"} <= set(d["seeds"][0])
    assert js["methods"]["full"]["chosen_lr"] == lr_grid.lr_of(-8)
    assert js["methods"]["lora-pro-adamw"]["chosen_lr"] == lr_grid.lr_of(-9)
    # the gap closure against the runs' own samples
    acc = {m: np.mean([[json.loads(x)["correct"] for x in Path(r["run_dir"], "samples.jsonl").read_text().splitlines()]
                       for r in lm_report.collect(Path(a.out), [m])[m]["seeds"]]) for m in js["methods"]}
    g = js["gap_closure"]["eval_acc"]
    np.testing.assert_allclose(g["lora-pro"]["closure"], (acc["lora-pro"] - acc["lora"]) / (acc["full"] - acc["lora"]))
    assert (tmp_path / "results" / "lm_sweep.png").stat().st_size > 10_000
    md = (tmp_path / "bench" / "RESULTS.md").read_text()
    assert lm_report.SECTION in md and "## Other\n\nkept" in md and text in md


# ------------------------------------------------------------------------------------------ the mechanism


def _projection_np(a, b, g):
    """float64 oracle: the projection of g (I, O) onto {a Y + Z b}: P_a g + g P_b − P_a g P_b."""
    pa = a @ np.linalg.pinv(a.T @ a) @ a.T
    pb = b.T @ np.linalg.pinv(b @ b.T) @ b
    return pa @ g + g @ pb - pa @ g @ pb


def _cos(x, y):
    return float(np.vdot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("zero_b", [False, True])
def test_mechanism_gradient_figures_match_a_float64_oracle(zero_b):
    """The figures of `support.lm_mechanism` on random nodes and a random full gradient, with the LoRA
    gradients the chain rule gives (ga = s·g bᵀ, gb = s·aᵀ g): LoRA's g̃ = s²(g bᵀb + a aᵀ g), the
    projection of g (at b = 0: P_a g)."""
    from support.lm_mechanism import _gradient_figures, _update_figures

    rng = np.random.default_rng(3)
    nodes, grads, gfull, want = [], [], [], []
    for shape, r, s in (((24, 16), 4, 2.0), ((16, 40), 8, 0.5)):
        w = rng.normal(size=shape)
        a = rng.normal(size=(shape[0], r)) * 0.3
        b = np.zeros((r, shape[1])) if zero_b else rng.normal(size=(r, shape[1])) * 0.3
        g = rng.normal(size=shape)
        node = lora_jax.LoRA(w=jnp.asarray(w, jnp.float32), a=jnp.asarray(a, jnp.float32),
                             b=jnp.asarray(b, jnp.float32), scale=s, roles="io")
        ga, gb = s * g @ b.T, s * a.T @ g
        nodes.append(node)
        grads.append(lora_jax.LoRA(w=None, a=jnp.asarray(ga, jnp.float32), b=jnp.asarray(gb, jnp.float32),
                                   scale=s, roles="io"))
        gfull.append(jnp.asarray(g, jnp.float32))
        eq = s * (ga @ b + a @ gb)
        proj = _projection_np(a, b, g)
        want.append([np.linalg.norm(eq - g) / np.linalg.norm(g), _cos(eq, g),
                     np.linalg.norm(proj - g) / np.linalg.norm(g), _cos(proj, g)])
    got = np.asarray(_gradient_figures(nodes, grads, gfull))
    np.testing.assert_allclose(got, np.array(want), rtol=2e-4, atol=2e-5)
    # the update figures: an update along -g has cosine 1 with -g
    new = [lora_jax.LoRA(w=n.w, a=n.a, b=n.b - 0.01 * jnp.asarray(np.asarray(n.a).T @ np.asarray(g)) / n.scale,
                         scale=n.scale, roles="io") for n, g in zip(nodes, gfull)]
    upd = np.asarray(_update_figures(nodes, new, gfull, None))
    for i, (n, g) in enumerate(zip(nodes, gfull)):
        dk = n.scale * np.asarray(n.a) @ (np.asarray(new[i].b) - np.asarray(n.b))
        np.testing.assert_allclose(upd[i, 0], _cos(dk, -np.asarray(g)), rtol=2e-4)
        assert upd[i, 0] > 0


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from test_llama import train_tiny_bpe, write_tiny_gguf

    path = tmp_path_factory.mktemp("tiny_lm") / "tiny.gguf"
    write_tiny_gguf(path, train_tiny_bpe())
    return path


def test_mechanism_replays_a_real_run(tiny_gguf, tmp_path):
    """A `train.lm` run with the sweep's own flags (Algorithm 2, the tiny random Llama), then
    `support.lm_mechanism.replay`: the replayed losses equal the run's log, and the figures obey
    their laws — the projection is at least as close to g as LoRA's g̃ in cosine (it is the
    best tangent-space approximation), cosines lie in [-1, 1], and Algorithm 2's applied change
    points along its full-shape AdamW step."""
    from support.lm_fidelity import run_args
    from support.lm_mechanism import replay
    from train import lm

    a = SimpleNamespace(model=str(tiny_gguf), steps=6, batch_size=4, eval_limit=4, val_limit=4, ckpt_every=0)
    lm.main(run_args(a, "lora-pro-adamw", 3e-3, 0) + ["--out", str(tmp_path), "--name", "run", "--max-new-tokens", "4",
                                                       "--eval-batch-size", "4"])
    res = replay(a, "lora-pro-adamw", 3e-3, tmp_path / "run")
    assert res["replayed_steps"] == 6 and res["logged_steps_compared"] == 6
    assert res["replay_vs_log_max_abs_loss_diff"] < 1e-5
    assert [p["step"] for p in res["points"]] == [0, 2, 4, 5]
    for p in res["points"]:
        assert all(-1 - 1e-5 <= p[k] <= 1 + 1e-5 for k in p if "cos" in k)
        assert p["projection_cos"] >= p["lora_eq_cos"] - 1e-4
        assert 0 <= p["projection_rel_err"] <= 1 + 1e-5  # an orthogonal projection never lengthens
        assert p["update_cos_adamw_step"] > 0 and p["update_norm_over_adamw_step"] > 0
