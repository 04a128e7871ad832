"""The PyTorch-peer harness shared by bench/peers.py and the cross-check tests: the peers' virtual
environment, the worker that runs the PyTorch side there, one classifier case (model, weights,
batch, adapters) written once for both frameworks, and the JAX side's steps and forwards.

The peers live in their own virtual environment (``.venv-peers`` at the repository root, or
``$LORA_JAX_PEERS_VENV``), created by `ensure_venv` when missing: ``pip install torch==2.13.0``
first (the CPU build this machine's pip takes from its local wheel; letting pip choose another
version pulls a multi-GB CUDA build), then transformers, peft, lora-pro-adamw, safetensors and gguf
(transformers' GGUF loader) with that torch pinned. The PyTorch side runs there as a subprocess
(support/peers_worker.py, one job per call with `run_worker`, or the timing server `Server`), the
JAX side in this process; both
hold the same weights (written once as a HF state dict), the same batch (random token ids, no
padding, random labels), rank, alpha and targets (every attention and FFN Linear:
`train.bert.LORA_TARGETS`), the same adapters (``b`` set nonzero, so LoRA-Pro's algebra is
exercised as after the first step) and AdamW hyper-parameters. Dropout is off on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "support" / "peers_worker.py"
DEFAULT_VENV = ROOT / ".venv-peers"
TORCH = "torch==2.13.0"
PEER_PACKAGES = ("transformers==5.24.0", "peft==0.21.2", "lora-pro-adamw==0.2.1", "safetensors", "gguf>=0.10")

JAX_METHODS = ("jax_full", "jax_lora", "jax_lora_pro_efficient", "jax_lora_pro_adamw")
TORCH_METHODS = ("full", "lora", "lora_pro_full", "lora_pro_efficient")
LABELS = {
    "jax_full": "lora_jax full FT (optax.adamw)",
    "jax_lora": "lora_jax LoRA",
    "jax_lora_pro_efficient": "lora_jax LoRA-Pro efficient",
    "jax_lora_pro_adamw": "lora_jax LoRA-Pro AdamW (Alg. 2)",
    "torch_full": "PyTorch full FT (AdamW)",
    "torch_lora": "PEFT LoRA (AdamW)",
    "torch_lora_pro_full": "lora-pro-adamw mode=full",
    "torch_lora_pro_efficient": "lora-pro-adamw mode=efficient",
}


# ------------------------------------------------------------------------------------------------
# the peers' virtual environment


def venv_dir() -> Path:
    return Path(os.environ.get("LORA_JAX_PEERS_VENV", DEFAULT_VENV))


def peers_python(check: bool = True) -> Path | None:
    """The peers venv's python if it exists and imports torch, transformers, peft, lora_pro and
    gguf (``check``); else None."""
    py = venv_dir() / "bin" / "python"
    if not py.is_file():
        return None
    if check:
        r = subprocess.run([str(py), "-c", "import torch, transformers, peft, lora_pro, safetensors, gguf"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None
    return py


def ensure_venv(verbose: bool = True) -> Path:
    """Create the peers venv if needed (see the module docstring); returns its python."""
    py = peers_python()
    if py is not None:
        return py
    venv = venv_dir()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    if not (venv / "bin" / "python").is_file():
        say(f"creating {venv}")
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    say(f"installing {TORCH} (first, alone: pinned so pip never picks a CUDA build)")
    subprocess.run(pip + [TORCH], check=True)
    say(f"installing {' '.join(PEER_PACKAGES)}")
    subprocess.run(pip + [*PEER_PACKAGES, TORCH], check=True)
    py = peers_python()
    if py is None:
        raise RuntimeError(f"{venv}: the peers do not import after installing them")
    return py


def run_worker(spec: dict, workdir: Path, python: Path | None = None, timeout: float = 900) -> dict:
    """Run one worker job (support/peers_worker.py SPEC) in the peers venv; returns its JSON."""
    python = python or peers_python(check=False)
    if python is None:
        raise RuntimeError("no peers venv: run `python -m bench.peers --setup-only`")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"spec_{spec['job']}_{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    r = subprocess.run([str(python), str(WORKER), str(path)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode != 0:
        raise RuntimeError(f"peers worker failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# identical model, batch and adapters on both sides


@dataclasses.dataclass
class Case:
    """A classifier with adapters, its batch, and the files that hand them to the worker."""

    config: object
    model: object
    params: dict       # plain Classifier params (base model)
    adapted: dict      # params with LoRA nodes
    batch: dict        # numpy: input_ids, attention_mask, token_type_ids, labels
    modules: list      # HF module paths adapted
    rank: int
    alpha: float
    files: dict        # state, inputs, adapter (paths), hf_config (dict)
    dora: bool = False  # DoRA nodes (the worker builds PEFT's use_dora model)


def make_case(kind: str, workdir: Path, *, batch: int = 16, seq: int = 64, rank: int = 8,
              alpha: float = 16.0, num_labels: int = 2, seed: int = 0, b_scale: float = 0.02,
              config_overrides: dict | None = None, dora: bool = False) -> Case:
    """`kind`: "minilm" (real weights), "bert-base" (BERT-base shape, random), or "tiny" (2 layers,
    hidden 32, random). Pooling "pooler" (HF's BertForSequenceClassification head), dropout 0.
    Adapters: lora_jax.apply's init for ``a``, then ``b ~ b_scale·N(0, 1)`` (0: b = 0, PEFT's init).
    `dora`: DoRA nodes, ``m`` left at ``‖w‖`` (so with b ≠ 0 the magnitude is not the norm of the
    adapted weight, and the scale m/‖w + s·a@b‖ is exercised); the worker then needs ``dora=True``."""
    import jax
    from safetensors.numpy import save_file

    import lora_jax
    from train import bert, peft_format

    key = jax.random.key(seed)
    if kind == "minilm":
        from train import assets

        config, enc = bert.load_hf_safetensors(assets.minilm_dir(), with_pooler=True)
    elif kind == "bert-base":
        config, enc = bert.BertConfig(), None
    elif kind == "tiny":
        config, enc = bert.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=128), None
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    config = dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 **(config_overrides or {}))
    model, variables = bert.init_classifier(config, num_labels, jax.random.fold_in(key, 0), enc,
                                            pooling="pooler", dropout_rate=0.0)
    params = variables["params"]
    if enc is None:
        # Random init. HF's normal(0.02) kernels make a small model's logits ~0.01 and its adapter
        # gradients ~1e-6, where Adam's ε and float32 rounding decide the step; LeCun-normal
        # kernels (std 1/√fan_in) and perturbed LayerNorm/bias vectors keep everything O(1).
        def fix(path, x, k):
            name = jax.tree_util.keystr(path)
            if x.ndim == 1:
                return x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
            if "kernel" in name:
                return x * (1.0 / (config.initializer_range * np.sqrt(x.shape[0])))
            return x
        leaves, tdef = jax.tree_util.tree_flatten_with_path(params)
        ks = jax.random.split(jax.random.fold_in(key, 5), len(leaves))
        params = jax.tree_util.tree_unflatten(tdef, [fix(p, x, k) for (p, x), k in zip(leaves, ks)])
    adapted = lora_jax.apply(params, rank, alpha=alpha, targets=bert.LORA_TARGETS, dora=dora,
                             key=jax.random.fold_in(key, 1))
    if b_scale:
        leaves, tdef = jax.tree_util.tree_flatten(adapted, is_leaf=lora_jax.is_lora)
        ks = jax.random.split(jax.random.fold_in(key, 2), len(leaves))
        leaves = [lora_jax.LoRA(w=n.w, a=n.a, b=b_scale * jax.random.normal(k, n.b.shape, n.b.dtype),
                                scale=n.scale, roles=n.roles, dropout=n.dropout, m=n.m)
                  if lora_jax.is_lora(n) else n for n, k in zip(leaves, ks)]
        adapted = jax.tree_util.tree_unflatten(tdef, leaves)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, config.vocab_size, size=(batch, seq)).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, num_labels, size=(batch,)).astype(np.int32)}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {"state": str(workdir / "state.safetensors"), "inputs": str(workdir / "inputs.npz"),
             "adapter": str(workdir / "adapter.safetensors"),
             "hf_config": peft_format.hf_config_dict(config, num_labels)}
    save_file(peft_format.hf_state_dict(params, config), files["state"])
    np.savez(files["inputs"], **data)
    tensors, found = peft_format.adapter_tensors(adapted, config)
    save_file(tensors, files["adapter"])
    return Case(config, model, params, adapted, data, sorted(found), rank, alpha, files, dora)


def worker_spec(case: Case, job: str, out: Path, **extra) -> dict:
    spec = {"job": job, "hf_config": case.files["hf_config"], "state": case.files["state"],
            "inputs": case.files["inputs"], "adapter": case.files["adapter"], "r": case.rank,
            "alpha": case.alpha, "target_modules": case.modules, "out": str(out),
            "num_labels": case.files["hf_config"]["num_labels"], "dora": case.dora}
    spec.update(extra)
    return spec


# ------------------------------------------------------------------------------------------------
# the JAX steps


def jax_batch(case: Case):
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in case.batch.items()}


def jax_loss(case: Case, *, full: bool = False):
    """``(loss_fn, trainable, frozen)``: mean cross-entropy ``loss_fn(trainable, frozen, batch)``.
    Full FT trains every parameter (frozen None); otherwise the LoRA factors and the head."""
    import optax

    import lora_jax

    model = case.model

    def ce(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    if full:
        def loss_fn(tr, fr, b):
            return ce(model.apply({"params": tr}, b["input_ids"], b["attention_mask"], b["token_type_ids"]),
                      b["labels"])
        return loss_fn, case.params, None
    trainable, frozen = lora_jax.split(case.adapted, trainable=r"^head/")
    fwd = lora_jax.wrap(model.apply)

    def loss_fn(tr, fr, b):
        p = lora_jax.combine(tr, fr)
        return ce(fwd({"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"]), b["labels"])
    return loss_fn, trainable, frozen


def jax_lora_grads(case: Case) -> dict[str, np.ndarray]:
    """The raw gradients (before any optimizer) of the LoRA factors and the head, as PEFT tensors
    (PEFT's names and orientation: the gradient of ``lora_A.weight`` is that of ``a``, transposed)."""
    import jax

    import lora_jax
    from train import peft_format

    loss_fn, tr, fr = jax_loss(case)
    g = jax.jit(jax.grad(loss_fn))(tr, fr, jax_batch(case))
    return peft_format.adapter_tensors(lora_jax.combine(g, fr), case.config)[0]


def _attention64(q, k, v, mask, *, implementation=None):
    """`train.bert.attention`'s maths (softmax over the unmasked keys) in the inputs' dtype:
    `jax.nn.dot_product_attention` takes its softmax in float32 whatever the inputs."""
    import jax
    import jax.numpy as jnp

    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


class Float64Classifier:
    """``Classifier(pooling="pooler")`` with dropout off, computed wholly in float64 (needs
    ``jax_enable_x64``), for the float64 cross-checks only. Two pieces of `train.bert` compute in
    float32 whatever the dtypes: `Classifier`'s head (pinned to float32) and `bert.attention`
    (`jax.nn.dot_product_attention`'s softmax). So this applies the same parameters through the
    float64 `BertEncoder` (pooler included) with `bert.attention` swapped for `_attention64` while
    tracing, then the head's ``pooled @ kernel + bias`` in float64."""

    def __init__(self, config):
        import jax.numpy as jnp

        from train import bert

        self.encoder = bert.BertEncoder(config, jnp.float64, jnp.float64, with_pooler=True)

    def apply(self, variables, input_ids, attention_mask=None, token_type_ids=None):
        from train import bert

        p = variables["params"]
        saved, bert.attention = bert.attention, _attention64
        try:
            _, pooled = self.encoder.apply({"params": p["encoder"]}, input_ids, attention_mask, token_type_ids)
        finally:
            bert.attention = saved
        return pooled @ p["head"]["kernel"] + p["head"]["bias"]


def as_float64(case: Case) -> Case:
    """The same case in float64 (weights, adapters and head cast exactly from their float32
    values; the files handed to the worker are unchanged, the worker casts with ``dtype``).
    Call with ``jax_enable_x64`` on (see `x64`)."""
    import jax
    import jax.numpy as jnp

    import lora_jax

    if not jax.config.jax_enable_x64:
        raise RuntimeError("as_float64 needs jax_enable_x64 (use peers.x64())")

    def cast(t):
        return jax.tree.map(
            lambda x: x.astype(jnp.float64) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x, t)

    adapted = jax.tree.map(
        lambda n: lora_jax.LoRA(w=cast(n.w), a=cast(n.a), b=cast(n.b), scale=n.scale, roles=n.roles,
                                dropout=n.dropout, m=None if n.m is None else cast(n.m))
        if lora_jax.is_lora(n) else cast(n),
        case.adapted, is_leaf=lora_jax.is_lora)
    return dataclasses.replace(case, model=Float64Classifier(case.config), params=cast(case.params),
                               adapted=adapted)


class x64:
    """Context manager: ``jax_enable_x64`` on inside, restored on exit."""

    def __enter__(self):
        import jax

        self.prev = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        return self

    def __exit__(self, *exc):
        import jax

        jax.config.update("jax_enable_x64", self.prev)


def make_jax_method(case: Case, method: str, *, lr: float = 1e-3, weight_decay: float = 0.0,
                    eps: float = 1e-8, lora_pro_kwargs: dict | None = None):
    """``(step, state)`` with ``state = (trainable, opt_state, frozen)`` and
    ``step(state, batch) -> (state, loss)`` jitted (trainable and optimizer state donated)."""
    import jax
    import optax

    import lora_jax

    kw = lora_pro_kwargs or {}
    loss_fn, trainable, frozen = jax_loss(case, full=method == "jax_full")
    if method == "jax_full":
        opt = optax.adamw(lr, eps=eps, weight_decay=weight_decay)
    else:
        if method == "jax_lora":
            opt = optax.adamw(lr, eps=eps, weight_decay=weight_decay)
        elif method == "jax_lora_pro_efficient":
            opt = optax.chain(lora_jax.lora_pro(**kw), optax.adamw(lr, eps=eps, weight_decay=weight_decay))
        elif method == "jax_lora_pro_adamw":
            opt = lora_jax.lora_pro_adamw(lr, eps=eps, weight_decay=weight_decay, **kw)
        else:
            raise ValueError(method)

    def step(tr, opt_state, fr, b):
        loss, g = jax.value_and_grad(loss_fn)(tr, fr, b)
        upd, opt_state = opt.update(g, opt_state, tr)
        return optax.apply_updates(tr, upd), opt_state, loss

    jstep = jax.jit(step, donate_argnums=(0, 1))
    # copies: the step donates its inputs, the Case keeps its arrays
    trainable = jax.tree.map(lambda x: x.copy(), trainable)  # None holes are empty subtrees
    return jstep, [trainable, opt.init(trainable), frozen], step


def run_jax_steps(case: Case, method: str, steps: int, **kw) -> list[dict[str, np.ndarray]]:
    """The adapters (and head) after each of `steps` steps of `method`, as PEFT tensors (NumPy)."""
    import jax

    import lora_jax
    from train import peft_format

    _, (tr, st, fr), raw = make_jax_method(case, method, **kw)
    step = jax.jit(raw)
    out = []
    for _ in range(steps):
        tr, st, _ = step(tr, st, fr, jax_batch(case))
        out.append(peft_format.adapter_tensors(lora_jax.combine(tr, fr), case.config)[0])
    return out


def jax_forwards(case: Case):
    """{which: (jitted fn, params)} for base / unmerged / merged forward passes."""
    import jax

    import lora_jax

    model = case.model
    plain = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                             b["token_type_ids"]))
    wrapped_fn = lora_jax.wrap(model.apply)
    unmerged = jax.jit(lambda p, b: wrapped_fn({"params": p}, b["input_ids"], b["attention_mask"],
                                               b["token_type_ids"]))
    merged = jax.block_until_ready(lora_jax.merge(case.adapted))
    return {"base": (plain, case.params), "unmerged": (unmerged, case.adapted), "merged": (plain, merged)}


def flops_of(fn, *args) -> float | None:
    import jax

    try:
        ca = jax.jit(fn).lower(*args).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - a profile figure, not essential
        return None


# ------------------------------------------------------------------------------------------------
# the benchmark


class Server:
    """The worker in --serve mode: one JSON command a line."""

    def __init__(self, python: Path):
        self.p = subprocess.Popen([str(python), str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def __call__(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("peers worker exited")
        out = json.loads(line)
        if not out.get("ok"):
            raise RuntimeError(f"peers worker: {out.get('error')}\n{out.get('trace', '')}")
        return out

    def close(self):
        try:
            self(op="quit")
        except Exception:  # noqa: BLE001
            pass
        self.p.wait(timeout=30)


def jax_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "load_avg_start": os.getloadavg()}
