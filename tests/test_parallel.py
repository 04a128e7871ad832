"""train.classify on many devices and processes (`train.parallel`): the same parameters as one
device under data parallel, FSDP and pmap; FSDP memory and collectives read off the compiled step;
a real two-process `jax.distributed` run, its checkpoints restored on other meshes (both ways);
and a process killed mid-run.

Devices are forced CPU devices (``--xla_force_host_platform_device_count``), set in subprocesses
before JAX starts; processes talk through JAX's coordination service and gloo on localhost. The
model is the tiny random BERT of test_classify on the real movie-review sentences.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from test_classify import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _env(devices: int) -> dict:
    # float64 (JAX_ENABLE_X64 and --dtype float64, see _argv)
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))


def _argv(tiny, out, method, name, *extra, steps=STEPS):
    """Dropout off: pmap draws its masks per device (see train.parallel). Float64: the tiny random
    BERT's attention is nearly uniform, so its query/key gradients come out of a softmax cancellation
    that loses ~8 digits (in float64 they agree between layouts to ~3e-8 while the logits agree to
    3e-17); in float32 that noise, normalised by Adam, moves LoRA-Pro runs apart by 1e-4..1e-3 in
    three steps, whatever the layout, and would hide a real layout bug."""
    return ["--dtype", "float64", "--model", str(tiny), "--method", method, "--steps", str(steps), "--batch-size", "16",
            "--max-len", "32", "--train-limit", "64", "--eval-limit", "20", "--eval-every", str(steps),
            "--ckpt-every", "2", "--keep", "5", "--dropout", "0", "--lr", "1e-2", "--quiet", "--no-plot",
            "--out", str(out), "--name", name, *extra]


def _python(code: str, devices: int, timeout=900, **kw):
    proc = subprocess.run([sys.executable, "-c", code], env=_env(devices), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _state(run_dir: Path, step: int) -> list[np.ndarray]:
    """The arrays of a checkpoint, read with orbax alone (no target, no sharding), in leaf order."""
    import orbax.checkpoint as ocp

    step_dir = run_dir / "ckpt" / str(step)
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    target = {f"{i:05d}": np.zeros(shape, np.dtype(dtype))
              for i, (shape, dtype) in enumerate(zip(meta["shapes"], meta["dtypes"]))}
    got = ocp.StandardCheckpointer().restore(step_dir / "state", target)
    return [np.asarray(got[k]) for k in sorted(got)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _max_rel(got: list, ref: list) -> float:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
    return max(_rel(g, r) for g, r in zip(got, ref))


LAYOUTS = {"one": [], "data8": ["--mesh", "data=8"], "data4fsdp2": ["--mesh", "data=4,fsdp=2"],
           "fsdp8": ["--mesh", "fsdp=8"], "pmap": ["--pmap"]}


FAST = [("lora-pro", "one"), ("lora-pro", "data8"), ("lora-pro", "pmap"),
        ("lora-pro-adamw", "one"), ("lora-pro-adamw", "data4fsdp2"),
        ("dora", "one"), ("dora", "fsdp8")]  # DoRA's magnitudes m placed from their sharded kernels
EVERY = [(m, name) for m in ("lora-pro", "lora-pro-adamw") for name in LAYOUTS]


@pytest.mark.parametrize("runs", [pytest.param(FAST, id="some"),
                                  pytest.param(EVERY, id="every", marks=pytest.mark.slow)])
def test_layouts_on_8_devices_match_one_device(tiny, tmp_path, runs):
    """LoRA-Pro (both modes) and DoRA: data parallel, FSDP and pmap give one device's parameters (≤ 1e-5)."""
    code = textwrap.dedent(f"""
        import jax
        from train import classify
        assert jax.device_count() == 8
        for method, name in {runs!r}:
            argv = {_argv(tiny, tmp_path, "METHOD", "NAME")!r}
            argv[argv.index("METHOD")] = method
            argv[argv.index("NAME")] = method + "-" + name
            s = classify.main(argv + {LAYOUTS!r}[name])
            print("RUN", method, name, s["layout"], s["final_loss"], flush=True)
    """)
    out = _python(code, 8)
    assert out.count("RUN") == len(runs), out
    errors = {(method, name): _max_rel(_state(tmp_path / f"{method}-{name}", STEPS),
                                       _state(tmp_path / f"{method}-one", STEPS))
              for method, name in runs if name != "one"}
    print("max relative difference to one device after", STEPS, "steps:", errors)
    assert all(e <= 1e-5 for e in errors.values()), errors
    # and they did train: the parameters moved
    first = _state(tmp_path / "lora-pro-one", 2)
    assert _max_rel(_state(tmp_path / "lora-pro-one", STEPS), first) > 1e-3


FSDP_CHECK = textwrap.dedent(r"""
    import json
    from pathlib import Path
    from support.fsdp import measure
    res = {name: measure(Path(TINY), mesh, "sharded", batch=16, seq=32, rounds=0)
           for name, mesh in (("fsdp=8", "fsdp=8"), ("one", None))}
    print("FSDP", json.dumps(res))
""")


def test_fsdp_splits_frozen_weights_and_moments_and_gathers_no_weight(tiny):
    """FSDP over 8 devices: each device holds 1/8 of the frozen kernels and of LoRA-Pro AdamW's
    moments; the compiled step's argument bytes shrink accordingly and no all-gather rebuilds a
    frozen weight of 1024 or more numbers (any axis order) anywhere in the step."""
    out = _python(f"TINY = {str(tiny)!r}\n" + FSDP_CHECK, 8, timeout=600)
    res = json.loads(out.split("FSDP ", 1)[1])
    f8, one = res["fsdp=8"], res["one"]
    on0, total = f8["frozen_weights"]
    assert on0 * 8 == total, f8["frozen_weights"]
    m0, mtotal = f8["moments"]
    assert m0 * 8 == mtotal and mtotal > 0, f8["moments"]
    assert one["frozen_weights"][0] == one["frozen_weights"][1]  # one device holds everything
    # the step's per-device inputs: frozen half, adapters, moments and batch, mostly split 8 ways
    assert f8["argument_bytes"] < 0.2 * one["argument_bytes"], (f8["argument_bytes"], one["argument_bytes"])
    # every kernel and embedding table but the 2-row token-type table (64 numbers, which XLA
    # gathers for its own lookup: cheaper than splitting the lookup)
    rebuilt = [s for s in f8["weight_shaped_gathers"] if np.prod(s) >= 1024]
    assert f8["all_gathers"] > 0, "an FSDP step must communicate"
    assert not rebuilt, f"all-gathers of frozen-weight shape: {rebuilt}"
    print("FSDP per-device/total frozen kernels", on0, total, "moments", m0, mtotal,
          "argument bytes", f8["argument_bytes"], "vs one device", one["argument_bytes"])


# ------------------------------------------------------------------------------ several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn_two(argv: list[str], log_dir: Path, heartbeat: int = 10) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for pid in range(2):
        log = open(log_dir / f"proc{pid}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-u", "-m", "train.classify", *argv, "--coordinator", f"localhost:{port}",
             "--num-processes", "2", "--process-id", str(pid), "--heartbeat-timeout", str(heartbeat)],
            env=_env(4), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs, log_dir: Path, timeout=600):
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1, deadline - time.time()))
    logs = [(log_dir / f"proc{i}.log").read_text() for i in range(len(procs))]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(l[-4000:] for l in logs)
    return logs


RESTORE = textwrap.dedent(r"""
    import sys, json
    from pathlib import Path
    import numpy as np, jax
    from train import classify, hosts, parallel
    from train.checkpoint import Checkpointer
    run_dir, argv = Path(sys.argv[1]), json.loads(sys.argv[2])
    args = classify.parse_args(argv)
    par = parallel.from_args(args)
    setup = classify.build(args, Path(args.model), 2, par)
    like = (setup.trainable, par.on_devices(setup.optimizer.init(setup.trainable)))
    ckpt = Checkpointer(run_dir / "ckpt", every=2)
    (tr, state), meta = ckpt.restore(like)  # verified against the checksum saved with it
    leaves = jax.tree_util.tree_leaves((tr, state))
    kinds = sorted({type(x.sharding).__name__ + str(getattr(x.sharding, "spec", "")) for x in leaves})
    np.savez(sys.argv[3], *[np.asarray(hosts.to_host(x)) for x in leaves])
    print("RESTORED", meta["step"], jax.device_count(), kinds)
""")


def _restore(run_dir: Path, argv: list[str], devices: int, out: Path) -> list[np.ndarray]:
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(run_dir), json.dumps(argv), str(out)],
                          env=_env(devices), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "RESTORED" in proc.stdout
    with np.load(out) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


@pytest.mark.slow  # ~3 min on 2 cores
def test_two_processes_match_one_and_checkpoints_cross_meshes(tiny, tmp_path):
    """A real two-process jax.distributed run (4 CPU devices each, FSDP over all 8) resumes a run
    checkpointed by one single-device process and ends where the uninterrupted single-device run
    does; its checkpoint (written by both processes) restores in one process on 1 device and on 8."""
    method = "lora-pro-adamw"
    # the uninterrupted reference: one process, one device
    _python(f"from train import classify; classify.main({_argv(tiny, tmp_path, method, 'one')!r})", 1)
    # the same run, stopped after step 2 (its later checkpoint removed) and resumed by two processes
    import shutil

    shutil.copytree(tmp_path / "one", tmp_path / "multi")
    shutil.rmtree(tmp_path / "multi" / "ckpt" / str(STEPS))
    (tmp_path / "multi" / "ckpt.manifests" / f"{STEPS}.json").unlink(missing_ok=True)
    argv = _argv(tiny, tmp_path, method, "multi", "--resume", "--mesh", "data=2,fsdp=4")
    logs = _wait_all(_spawn_two(argv, tmp_path), tmp_path)
    assert "resumed from" in logs[0] and "train loss" in logs[0]  # process 0 reports
    assert "train loss" not in logs[1]  # process 1 stays quiet
    ref = _state(tmp_path / "one", STEPS)
    multi = _state(tmp_path / "multi", STEPS)
    err = _max_rel(multi, ref)
    print("two processes vs one device, relative difference:", err)
    assert err <= 1e-5
    # the two-process checkpoint on one device and on another 8-device mesh
    base = _argv(tiny, tmp_path, method, "multi")
    one = _restore(tmp_path / "multi", base, 1, tmp_path / "r1.npz")
    eight = _restore(tmp_path / "multi", base + ["--mesh", "fsdp=8"], 8, tmp_path / "r8.npz")
    assert _max_rel(one, multi) == 0.0 and _max_rel(eight, multi) == 0.0


def test_a_dead_process_stops_the_other_and_the_last_checkpoint_survives(tiny, tmp_path):
    """Process 1 is SIGKILLed mid-run: process 0 exits with JAX's error (not a hang) within the
    heartbeat timeout plus a margin; the last finalized checkpoint restores and verifies."""
    argv = _argv(tiny, tmp_path, "lora-pro", "dies", "--mesh", "data=8", steps=100000)
    procs = _spawn_two(argv, tmp_path, heartbeat=15)  # short, but not so short that a starved live process looks dead
    ckpt = tmp_path / "dies" / "ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.isdigit() and int(p.name) >= 4 for p in
                                             (ckpt.iterdir() if ckpt.is_dir() else [])):
        assert all(p.poll() is None for p in procs), (tmp_path / "proc0.log").read_text()[-3000:]
        time.sleep(0.5)
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.time()
    try:
        procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 still running 120 s after its peer died")
    waited = time.time() - t0
    log = (tmp_path / "proc0.log").read_text()
    print(f"process 0 stopped {waited:.1f} s after process 1 was killed, exit status {procs[0].returncode}")
    assert procs[0].returncode != 0
    # JAX's coordination service reports the silent peer; if process 0 was inside a collective when
    # its peer vanished, gloo may report the broken connection first, or (peer killed mid-send, seen
    # once under heavy load) the truncated message it was reading
    said = [m for m in ("stopped sending heartbeats", "another task died", "Connection closed by peer",
                        "Received data size doesn't match expected size") if m in log]
    print("process 0 said:", said, "| last line:", log.strip().splitlines()[-1][:300] if log.strip() else "")
    assert said, log[-3000:]
    restored = _restore(tmp_path / "dies", _argv(tiny, tmp_path, "lora-pro", "dies"), 1, tmp_path / "d.npz")
    assert restored and all(np.isfinite(x).all() for x in restored)


@pytest.mark.slow  # ~70 s
def test_lm_on_a_mesh_matches_one_device(tmp_path):
    """train.lm (tiny GGUF Llama) with FSDP over 8 devices ends where one device does; LoRA + AdamW
    in float32 (train.lm has no float64 mode; plain LoRA's gradients are well conditioned)."""
    pytest.importorskip("gguf")
    from test_llama import train_tiny_bpe, write_tiny_gguf

    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, train_tiny_bpe())
    common = ["--model", str(model), "--method", "lora", "--steps", "4", "--batch-size", "16", "--train-limit", "32",
              "--eval-limit", "8", "--eval-every", "4", "--ckpt-every", "2", "--max-new-tokens", "4",
              "--eval-batch-size", "8", "--out", str(tmp_path), "--quiet", "--no-plot", "--lr", "1e-2"]
    code = textwrap.dedent(f"""
        from train import lm
        for name, extra in (("one", []), ("mesh", ["--mesh", "data=2,fsdp=4"])):
            s = lm.main({common!r} + ["--name", name] + extra)
            print("RUN", name, s["eval_acc"], s["final_loss"], flush=True)
    """)
    env = _env(8)
    env.pop("JAX_ENABLE_X64")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    err = _max_rel(_state(tmp_path / "mesh", 4), _state(tmp_path / "one", 4))
    print("train.lm data=2,fsdp=4 vs one device:", err)
    assert err <= 1e-5


YNN = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import lora_jax
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    node = lora_jax.LoRA(w=f32(64, 64), a=f32(64, 8), b=f32(8, 64), scale=1.0, roles="io")
    f = jax.jit(lora_jax.wrap(lambda n, x: jnp.tanh(x @ n)))
    for rows in (8, 16):
        x = f32(rows, 8, 64)
        ref = f(node, x)
        got = f(node, jax.device_put(x, NamedSharding(mesh, P("d"))))
        print("ROWS", rows // 8, float(jnp.abs(got - ref).max()))
""")


@pytest.mark.parametrize("ynn", ["on", "off"])
def test_xla_cpu_unit_rows_per_device(ynn):
    """The XLA:CPU miscompile that `train.parallel` refuses: with one row per device, the factored
    product is wrong by O(1) under YNNPACK fusion (jaxlib 0.10.2) and exact without it. If a newer
    jaxlib fixes it, this test fails on "on": then drop the refusal in `Parallel.check_batch`."""
    from lora_jax._compat import YNN_OFF

    env = _env(8)
    env.pop("JAX_ENABLE_X64")
    if ynn == "off":
        env["XLA_FLAGS"] += " " + YNN_OFF
    proc = subprocess.run([sys.executable, "-c", YNN], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = {int(l.split()[1]): float(l.split()[2]) for l in proc.stdout.splitlines() if l.startswith("ROWS")}
    print("max abs error by rows per device:", err)
    assert err[2] < 1e-5
    if ynn == "on":
        assert err[1] > 0.1  # the bug the refusal guards against
    else:
        assert err[1] < 1e-5


def test_one_row_per_cpu_device_is_refused(tmp_path):
    code = textwrap.dedent("""
        from train import classify, loop
        try:
            classify.main(["--model", "X/no-model", "--mesh", "data=8", "--batch-size", "8", "--out", "X"])
        except loop.ConfigError as e:
            print("REFUSED", e)
    """).replace("X", str(tmp_path))
    env = _env(8)
    env.pop("JAX_ENABLE_X64")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "REFUSED" in proc.stdout and "YNNPACK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
