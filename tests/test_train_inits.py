"""The trainers' adapter inits and the methods beyond LoRA / LoRA-Pro (`train.task`, `train.optim`):
``--init lora-ga`` (the gradient estimate, step 0 at the base model, exact resume), ``--init
pissa/olora``, ``--rslora``, ``--method lora-plus`` / ``riemannian``, and the refusals.

On the tiny random BERT of test_classify (real movie-review sentences, MiniLM's tokenizer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from helpers import run_until
from test_classify import _args, make_tiny_model

KERNEL = ("encoder", "layer_0", "query", "kernel")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _job(tiny, tmp_path, *extra, method="lora"):
    """A built `Job` (data loaded) of train.classify with dropout off, and its batch order."""
    from train import classify, loop, parallel
    from train.task import Job

    args = classify.parse_args(_args(tiny, tmp_path, "--dropout", "0", *extra, method=method))
    par = parallel.Parallel("single")
    job = Job(args, par, tiny, tmp_path, classify.build(args, tiny, par=par))
    job.data = classify.TASK.load_data(job)
    order = loop.BatchOrder(args.seed, len(job.data.train["label"]), args.batch_size)
    return classify.TASK, job, order


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _logits(setup, params, batch):
    fwd = lora_jax.wrap(setup.model.apply)
    return fwd({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
               deterministic=True)


def test_lora_ga_init_is_the_svd_of_the_mean_gradient_and_starts_at_the_base_model(tiny, tmp_path):
    task, job, order = _job(tiny, tmp_path, "--init", "lora-ga", "--ga-batches", "3")
    setup = job.setup
    assert setup.trainable is None and setup.frozen is None and setup.pending is not None
    task.finish_lora_ga(job, order)
    from train.metrics import count

    assert setup.pending is None and setup.num_trainable == count(setup.trainable) > 0

    # oracle of the estimate: with dropout off and mean losses over equal batches, the mean of the
    # three batch gradients is the gradient of the mean loss over their 24 rows together
    rows = np.concatenate([order.indices(k) for k in range(3)])
    batch = {k: jnp.asarray(job.data.train[k][rows]) for k in task.batch_keys}
    g = jax.grad(lambda p: task.loss(setup.model.apply, p, batch, jax.random.key(0)))(setup.base)
    gk = np.asarray(_at(g, KERNEL), np.float64)
    p_, _, _ = np.linalg.svd(gk)
    node = _at(lora_jax.combine(setup.trainable, setup.frozen), KERNEL[:-1])["kernel"]
    a = np.asarray(node.a, np.float64)
    r = a.shape[-1]
    # "ArB2r": a holds the top r left singular vectors of the kernel's gradient (up to sign)
    np.testing.assert_allclose(np.abs(np.sum(a * p_[:, :r], axis=0)), np.ones(r), atol=2e-4)
    assert np.abs(a.T @ p_[:, r:2 * r]).max() < 2e-4  # not the next r

    # step 0 is the base model (the frozen kernels carry w − s·a@b)
    test = {k: jnp.asarray(v[:16]) for k, v in job.data.evald.items() if k in task.batch_keys}
    base = np.asarray(setup.model.apply({"params": setup.base}, test["input_ids"], test["attention_mask"],
                                        test["token_type_ids"], deterministic=True))
    adapted = np.asarray(_logits(setup, lora_jax.combine(setup.trainable, setup.frozen), test))
    assert np.abs(adapted - base).max() <= 1e-5 * np.abs(base).max()
    assert np.abs(np.asarray(node.w) - np.asarray(_at(setup.base, KERNEL))).max() > 1e-6  # w was offset


def test_lora_ga_run_resumes_bit_identical_and_a_changed_init_is_refused(tiny, tmp_path, monkeypatch):
    from train import classify, task
    from train.errors import ConfigError

    extra = ("--init", "lora-ga", "--ga-batches", "2")
    ref = classify.main(_args(tiny, tmp_path / "a", *extra, steps=12))
    part = _args(tiny, tmp_path / "b", *extra, steps=12)
    run_until(classify.main, part, stop_after=6)
    assert classify.main(part + ["--resume"])["params_sha256"] == ref["params_sha256"]

    with pytest.raises(ConfigError, match="ga_batches"):
        classify.main(_args(tiny, tmp_path / "b", "--init", "lora-ga", "--ga-batches", "3", steps=12) + ["--resume"])
    # an init that comes out otherwise on resume (a nondeterministic gradient) is refused, not trained on
    orig = task.Task.finish_lora_ga

    def perturbed(self, job, order):
        orig(self, job, order)
        job.setup.trainable = jax.tree.map(lambda x: x * (1 + 1e-6), job.setup.trainable)

    monkeypatch.setattr(task.Task, "finish_lora_ga", perturbed)
    with pytest.raises(ConfigError, match="lora_ga_init_sha256"):
        classify.main(part + ["--resume"])


def _one_step(tiny, tmp_path, method, *extra):
    """(trainable before, after one step) of `method` at a constant lr, no warmup, no clipping."""
    from train import loop

    task, job, order = _job(tiny, tmp_path, "--warmup-ratio", "0", "--schedule", "constant", "--clip-norm", "0",
                            *extra, method=method)
    setup = job.setup
    step, _ = task.make_steps(setup, method)
    batch = {k: jnp.asarray(job.data.train[k][order.indices(0)]) for k in task.batch_keys}
    before = jax.tree.map(jnp.copy, setup.trainable)  # the step donates its inputs
    tr, _, _ = step(setup.trainable, setup.optimizer.init(setup.trainable), setup.frozen, batch,
                    loop.step_key(0, 0))
    return task, setup, batch, before, tr


def test_lora_plus_multiplies_b_steps_and_rslora_the_scale(tiny, tmp_path):
    # PiSSA: both factors nonzero, so both get a gradient at step 0
    _, _, _, t0, lora = _one_step(tiny, tmp_path / "l", "lora", "--init", "pissa")
    _, _, _, p0, plus = _one_step(tiny, tmp_path / "p", "lora-plus", "--init", "pissa", "--loraplus-ratio", "4")
    n0, nl, np_ = (_at(t, KERNEL[:-1])["kernel"] for t in (t0, lora, plus))
    assert np.array_equal(np.asarray(_at(p0, KERNEL[:-1])["kernel"].a), np.asarray(n0.a))  # same init
    np.testing.assert_allclose(np.asarray(np_.b - n0.b), 4 * np.asarray(nl.b - n0.b), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(np_.a - n0.a), np.asarray(nl.a - n0.a), rtol=1e-5, atol=1e-9)
    assert np.abs(np.asarray(nl.b - n0.b)).max() > 0

    task, job, _ = _job(tiny, tmp_path / "r", "--rslora")
    node = _at(lora_jax.combine(job.setup.trainable, job.setup.frozen), KERNEL[:-1])["kernel"]
    assert float(node.scale) == pytest.approx(16 / np.sqrt(8))


def test_riemannian_steps_along_the_preconditioned_gradient(tiny, tmp_path):
    task, setup, batch, t0, tr = _one_step(tiny, tmp_path, "riemannian", "--init", "pissa")
    g = jax.grad(lambda t: task.loss(lora_jax.wrap(setup.model.apply), lora_jax.combine(t, setup.frozen),
                                     batch, jax.random.key(0)))(t0)
    n0, n1, gn = (_at(t, KERNEL[:-1])["kernel"] for t in (t0, tr, g))
    a, b = np.asarray(n0.a, np.float64), np.asarray(n0.b, np.float64)
    ga = np.asarray(gn.a, np.float64) @ np.linalg.inv(b @ b.T + 1e-2 * np.eye(8))  # float64 oracle
    gb = np.linalg.inv(a.T @ a + 1e-2 * np.eye(8)) @ np.asarray(gn.b, np.float64)
    # Adam's first step is exactly -lr·g̃/(|g̃| + ε) (ε 1e-8); with |g̃| ~ 1e-5 the ε term moves it
    # by ~1e-3 relative, which tells the preconditioned gradient from the raw one
    def adam_first(g):
        return -1e-2 * g / (np.abs(g) + 1e-8)

    for new, old, gt, graw in ((n1.a, n0.a, ga, gn.a), (n1.b, n0.b, gb, gn.b)):
        d = np.asarray(new - old, np.float64)
        big = np.abs(gt) > 0.1 * np.abs(gt).max()  # where the float32 gradient's rounding cannot show
        np.testing.assert_allclose(d[big], adam_first(gt)[big], rtol=2e-5)
        assert not np.allclose(d[big], adam_first(np.asarray(graw, np.float64))[big], rtol=2e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_and_qr_inits_start_at_the_base_model(tiny, tmp_path, init):
    task, job, _ = _job(tiny, tmp_path, "--init", init, method="dora")
    setup = job.setup
    test = {k: jnp.asarray(v[:16]) for k, v in job.data.evald.items() if k in task.batch_keys}
    base = np.asarray(setup.model.apply({"params": setup.base}, test["input_ids"], test["attention_mask"],
                                        test["token_type_ids"], deterministic=True))
    adapted = np.asarray(_logits(setup, lora_jax.combine(setup.trainable, setup.frozen), test))
    assert np.abs(adapted - base).max() <= 1e-5 * np.abs(base).max()
    node = _at(setup.trainable, KERNEL[:-1])["kernel"]
    assert np.abs(np.asarray(node.b)).max() > 0  # not the zero-b init


@pytest.mark.parametrize("argv, message", [
    (["--method", "full", "--init", "pissa"], "--init: --method full trains no adapters"),
    (["--method", "probe", "--rslora"], "--rslora: --method probe trains no adapters"),
    (["--init", "lora-ga", "--export-peft", "x"], "offset base kernel"),
    (["--ga-batches", "0"], "--ga-batches must be >= 1"),
    (["--loraplus-ratio", "-1"], "--loraplus-ratio must be > 0"),
])
def test_flags_a_method_cannot_use_are_refused(argv, message):
    from train import classify
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        classify.parse_args(argv)


def test_lm_refuses_inits_that_need_the_float_kernels_on_a_quantized_base():
    from train import lm
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match="--init pissa moves part of each kernel"):
        lm.parse_args(["--base", "q4", "--init", "pissa"])


def test_a_run_written_before_the_init_flags_resumes_with_their_old_values(tiny, tmp_path, monkeypatch):
    from train import classify, flags
    from train.errors import ConfigError

    new = classify.Classify.trajectory
    monkeypatch.setattr(classify.Classify, "trajectory", tuple(k for k in new if k not in flags.TRAJECTORY_DEFAULTS))
    part = _args(tiny, tmp_path, steps=12)
    ref = classify.main(part)  # its checkpoints' configs lack init, ga_batches, rslora, loraplus_ratio
    monkeypatch.setattr(classify.Classify, "trajectory", new)
    assert classify.main(part + ["--resume"])["params_sha256"] == ref["params_sha256"]
    with pytest.raises(ConfigError, match="'init': \\('lora', 'pissa'\\)"):
        classify.main(part + ["--resume", "--init", "pissa"])
