"""The PyTorch side of support/peers.py (bench/peers.py, tests/test_peers.py). Runs in the peers' virtual
environment (torch, transformers, peft, lora-pro-adamw; no JAX): it never imports lora_jax.

    python support/peers_worker.py SPEC.json     # one job; prints one JSON line, writes spec["out"]
    python support/peers_worker.py --serve       # timing server: one JSON command a line on stdin,
                                               # one JSON answer a line on stdout

A spec names a model by its HF config (``hf_config``, with ``num_labels``) and weights
(``state``: a safetensors file with ``BertForSequenceClassification`` keys) or by a HF directory
(``model_dir``, loaded with ``from_pretrained``), a batch (``inputs``: an .npz with input_ids,
attention_mask, token_type_ids, labels) and the job:

* ``forward``: logits of the plain model, and with ``adapter`` (a PEFT safetensors file, PEFT
  key names) or ``peft_dir`` (``PeftModel.from_pretrained``) the PEFT model unmerged and merged;
* ``train``: ``steps`` training steps of ``method`` (full | lora | lora_pro_full |
  lora_pro_efficient) from the given adapters; writes the adapters (PEFT key names) and losses;
  ``ref_patches`` lists alignments applied to lora-pro-adamw (full mode: ``no_step0_branch``,
  ``fp32_v``; efficient mode: ``undamped_sylvester``, ``native_adam_dtype``; see
  `patched_reference`, `patched_efficient` and support/peer_differences.py);
* ``grads``: one forward and backward of the PEFT model with the given adapters: the raw
  gradients of lora_A/lora_B and the head under PEFT's names;
* ``peft_train_save``: PEFT's own init (``seed``), ``steps`` AdamW steps, ``save_pretrained`` to
  ``save_dir``, and the trained model's logits;
* ``profile``: torch.profiler's table of two PEFT LoRA steps and the products of one adapted
  Linear timed alone.

``dtype: "float64"`` runs the model (adapters, head and optimizer state) in float64.
Dropout is off everywhere (config probabilities 0 and ``eval()``), so both frameworks compute the
same function.
"""

from __future__ import annotations

import inspect
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# model and data


def build_model(spec):
    from transformers import BertConfig, BertForSequenceClassification

    attn = spec.get("attn_implementation", "sdpa")
    if spec.get("model_dir"):
        model = BertForSequenceClassification.from_pretrained(
            spec["model_dir"], num_labels=spec["num_labels"], attn_implementation=attn,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        cfg = dict(spec["hf_config"])
        cfg["hidden_dropout_prob"] = cfg["attention_probs_dropout_prob"] = 0.0
        cfg.pop("model_type", None)
        config = BertConfig(**cfg)
        config._attn_implementation = attn
        model = BertForSequenceClassification(config)
        if spec.get("state"):
            from safetensors.torch import load_file

            sd = load_file(spec["state"])
            missing, unexpected = model.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise SystemExit(f"state does not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


def load_inputs(path):
    z = np.load(path)
    batch = {k: torch.from_numpy(np.asarray(z[k], np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.from_numpy(np.asarray(z["labels"], np.int64)) if "labels" in z.files else None
    return batch, labels


def peft_model(model, spec, adapter=None):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["target_modules"],
                     lora_dropout=0.0, task_type="SEQ_CLS", modules_to_save=["classifier"],
                     use_rslora=spec.get("rslora", False), use_dora=spec.get("dora", False))
    pm = get_peft_model(model, cfg)
    if adapter is not None:
        from safetensors.torch import load_file

        tensors = load_file(adapter)
        res = set_peft_model_state_dict(pm, tensors)
        if spec.get("dora"):  # every magnitude must have been set (PEFT would keep its own ‖W‖ silently)
            have = sum(1 for k in tensors if k.endswith(".lora_magnitude_vector"))
            want_m = sum(1 for k in pm.state_dict() if ".lora_magnitude_vector." in k)
            if have != want_m:
                raise SystemExit(f"adapter has {have} DoRA magnitudes, the PEFT model {want_m}")
        bad = [k for k in res.unexpected_keys]
        if bad:
            raise SystemExit(f"adapter keys PEFT did not take: {bad[:5]}")
        # every lora_A/lora_B must have been set
        want = {k for k in pm.state_dict() if ".lora_A." in k or ".lora_B." in k}
        n_ab = sum(1 for k in tensors if ".lora_A." in k or ".lora_B." in k)
        if len(want) != n_ab:
            raise SystemExit(f"adapter has {n_ab} LoRA tensors, "
                             f"the PEFT model {len(want)}")
    pm.eval()
    return pm


def peft_tensors(pm):
    """PEFT's adapter state dict as NumPy (float64 kept, anything else float32)."""
    from peft import get_peft_model_state_dict

    def arr(v):  # a copy, never a view of the live parameters (.float() of a float32 tensor is itself)
        v = v.detach().cpu()
        return (v if v.dtype == torch.float64 else v.float()).numpy().copy()

    return {k: arr(v) for k, v in get_peft_model_state_dict(pm).items()}


def peft_grads(pm):
    """The ``.grad`` of every trainable tensor under PEFT's state-dict names (swapped into the
    parameters for `peft_tensors`, then restored)."""
    params = [p for p in pm.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.copy_(p.grad)
        out = peft_tensors(pm)  # copies
        for p, s in zip(params, saved):
            p.copy_(s)
    return out


def cast(model, spec):
    """``spec["dtype"] == "float64"``: the whole model (and so its optimizer state) in float64."""
    return model.double() if spec.get("dtype") == "float64" else model


# ------------------------------------------------------------------------------------------------
# lora-pro-adamw, and the alignments the cross-checks may apply to it

def patched_reference(patches):
    """lora_pro._lorapro with the named source edits applied (each is one documented definition
    difference, see support/peer_differences.py):

    * ``no_step0_branch``: the full mode's ``if step == 0:`` special case is never taken;
    * ``fp32_v``: the full mode's second moment accumulates g̃² in float32, not bf16-rounded g̃.
    Returns the patched ``lorapro_full_adjustment``."""
    from lora_pro import _lorapro

    src = inspect.getsource(_lorapro.lorapro_full_adjustment)
    n0 = src.count("if step == 0:")
    if "no_step0_branch" in patches:
        if n0 != 2:
            raise SystemExit(f"lora-pro-adamw changed: expected 2 step-0 branches, found {n0}")
        src = src.replace("if step == 0:", "if False:")
    if "fp32_v" in patches:
        old = "equiv_grad.to(torch.bfloat16),\n            equiv_grad.conj().to(torch.bfloat16),"
        if old not in src:
            raise SystemExit("lora-pro-adamw changed: bf16 second-moment update not found")
        src = src.replace(old, "equiv_grad,\n            equiv_grad.conj(),")
    ns = dict(vars(_lorapro))
    exec(compile(src, "<patched lorapro_full_adjustment>", "exec"), ns)
    return ns["lorapro_full_adjustment"]


def patched_efficient(patches):
    """lora_pro._lorapro.lorapro_efficient_adjustment with the named source edits applied:

    * ``undamped_sylvester``: X solves ``(BᵀB) X + X (AAᵀ) = C`` with the undamped Gram matrices
      (the shipped code passes ``SB + 1e-6·I`` and ``SA + 1e-6·I``, so its X has denominators
      λ_i + μ_j + 2e-6 in the eigenbases); its damped inverses of BᵀB and AAᵀ (the C, gA', the
      projector and (AAᵀ)⁻¹) are kept — lora_jax.lora_pro(damping=1e-6) damps those alike.
    * ``native_adam_dtype``: its Adam normalisation ``m̂/(√v̂+ε)`` in the moments' own dtype (the
      shipped code takes ``mA.float()`` etc.: float32 even for float64 factors; a no-op in float32).
    Returns the patched ``lorapro_efficient_adjustment``."""
    from lora_pro import _lorapro

    src = inspect.getsource(_lorapro.lorapro_efficient_adjustment)
    if "native_adam_dtype" in patches:
        olds = [f"{m}.float() / bias{i}" for m, i in (("mA", 1), ("vA", 2), ("mB", 1), ("vB", 2))]
        if any(src.count(o) != 1 for o in olds):
            raise SystemExit("lora-pro-adamw changed: float32 Adam normalisation not found")
        for o in olds:
            src = src.replace(o, o.replace(".float()", ""))
    if "undamped_sylvester" in patches:
        olds = ["X = _solve_sylvester_vec(SB_reg, SA_reg, C)", "X = _solve_sylvester(SB_reg, SA_reg, C)"]
        if any(src.count(o) != 1 for o in olds):
            raise SystemExit("lora-pro-adamw changed: damped Sylvester calls not found")
        for o in olds:
            src = src.replace(o, o.replace("SB_reg, SA_reg", "SB, SA"))
    ns = dict(vars(_lorapro))
    exec(compile(src, "<patched lorapro_efficient_adjustment>", "exec"), ns)
    return ns["lorapro_efficient_adjustment"]


def make_optimizer(method, model, spec):
    lr, wd = spec["lr"], spec.get("weight_decay", 0.0)
    betas, eps = tuple(spec.get("betas", (0.9, 0.999))), spec.get("eps", 1e-8)
    if method in ("full", "lora"):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas, eps=eps)
    from lora_pro import LoRAProAdamW, adamw as ref_adamw

    from lora_pro import _lorapro

    patches = spec.get("ref_patches", [])
    full = [p for p in patches if p in ("no_step0_branch", "fp32_v")]
    efficient = [p for p in patches if p in ("undamped_sylvester", "native_adam_dtype")]
    if set(patches) - set(full) - set(efficient):
        raise SystemExit(f"unknown ref_patches {sorted(set(patches) - set(full) - set(efficient))}")
    ref_adamw.lorapro_full_adjustment = patched_reference(full) if full else _lorapro.lorapro_full_adjustment
    ref_adamw.lorapro_efficient_adjustment = (patched_efficient(efficient) if efficient
                                              else _lorapro.lorapro_efficient_adjustment)
    mode = "full" if method == "lora_pro_full" else "efficient"
    return LoRAProAdamW(model, lr=lr, weight_decay=wd, betas=betas, eps=eps, lorapro_mode=mode,
                        efficient_solver=spec.get("efficient_solver", "vec"))


def train_step(model, opt, batch, labels):
    opt.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    return loss.detach()


def setup_method(method, spec, adapter=None):
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(spec)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        model = cast(model, spec)
        return model, make_optimizer(method, model, spec)
    pm = cast(peft_model(model, spec, adapter), spec)
    return pm, make_optimizer(method, pm, spec)


# ------------------------------------------------------------------------------------------------
# jobs


@torch.no_grad()
def logits_of(model, batch):
    logits = model(**batch).logits
    return (logits if logits.dtype == torch.float64 else logits.float()).numpy().copy()


def job_forward(spec):
    batch, _ = load_inputs(spec["inputs"])
    out = {}
    model = cast(build_model(spec), spec)
    out["base"] = logits_of(model, batch)
    if spec.get("peft_dir"):
        from peft import PeftModel

        pm = PeftModel.from_pretrained(model, spec["peft_dir"])
        pm.eval()
        out["unmerged"] = logits_of(pm, batch)
        out["merged"] = logits_of(pm.merge_and_unload(), batch)
    elif spec.get("adapter"):
        pm = cast(peft_model(model, spec, spec["adapter"]), spec)
        out["unmerged"] = logits_of(pm, batch)
        out["merged"] = logits_of(pm.merge_and_unload(), batch)
    np.savez(spec["out"], **out)
    return {"outputs": sorted(out)}


def job_train(spec):
    batch, labels = load_inputs(spec["inputs"])
    method = spec["method"]
    model, opt = setup_method(method, spec, spec.get("adapter"))
    losses, snaps = [], {}
    for i in range(spec["steps"]):
        losses.append(float(train_step(model, opt, batch, labels)))
        if method != "full":
            for k, v in peft_tensors(model).items():
                snaps[f"step{i + 1}/{k}"] = v
    if method == "full":
        snaps.update({f"final/{k}": v.detach().numpy() for k, v in model.state_dict().items()})
    np.savez(spec["out"], **snaps)
    return {"losses": losses}


def job_grads(spec):
    """The raw gradients (no optimizer) of the LoRA factors and the head, PEFT names."""
    batch, labels = load_inputs(spec["inputs"])
    pm = cast(peft_model(build_model(spec), spec, spec.get("adapter")), spec)
    pm.zero_grad(set_to_none=True)
    loss = F.cross_entropy(pm(**batch).logits, labels)
    loss.backward()
    np.savez(spec["out"], **peft_grads(pm))
    return {"loss": float(loss)}


def job_peft_train_save(spec):
    batch, labels = load_inputs(spec["inputs"])
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(spec)
    pm = peft_model(model, spec)  # PEFT's own init (Kaiming-uniform A, zero B) and fresh head copy
    opt = make_optimizer("lora", pm, spec)
    losses = [float(train_step(pm, opt, batch, labels)) for _ in range(spec["steps"])]
    pm.save_pretrained(spec["save_dir"])
    np.savez(spec["out"], logits=logits_of(pm, batch))
    return {"losses": losses}


def job_profile(spec):
    """Where a PEFT LoRA step's time goes: torch.profiler's self-CPU-time table over two steps
    (after two untimed), and the four products of one adapted Linear (rank 8, MiniLM's shapes,
    1024 tokens), each the mean of 30 calls after one untimed."""
    from torch.profiler import ProfilerActivity, profile

    batch, labels = load_inputs(spec["inputs"])
    model, opt = setup_method("lora", spec, spec.get("adapter"))
    for _ in range(2):
        train_step(model, opt, batch, labels)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            train_step(model, opt, batch, labels)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=38)

    def ms(f, n=30):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e3

    lines = ["# PyTorch products (ms): T x in x out: x@w, dW = xT@dy, grad a = xT@(dy@bT), grad b = (x@a)T@dy"]
    for (T, i, o) in [(1024, 384, 384), (1024, 384, 1536), (1024, 1536, 384)]:
        x, dy, w, a, b = torch.randn(T, i), torch.randn(T, o), torch.randn(i, o), torch.randn(i, 8), torch.randn(8, o)
        lines.append(f"{T}x{i}x{o}: {ms(lambda: x @ w):.3f} {ms(lambda: x.T @ dy):.3f} "
                     f"{ms(lambda: x.T @ (dy @ b.T)):.3f} {ms(lambda: (x @ a).T @ dy):.3f}")
    return {"table": table + "\n" + "\n".join(lines)}


JOBS = {"forward": job_forward, "train": job_train, "grads": job_grads, "peft_train_save": job_peft_train_save,
        "profile": job_profile}


# ------------------------------------------------------------------------------------------------
# timing server


def serve():
    state = {}

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "setup":
                spec = cmd["spec"]
                if spec.get("threads"):
                    torch.set_num_threads(int(spec["threads"]))
                batch, labels = load_inputs(spec["inputs"])
                state.update(spec=spec, batch=batch, labels=labels, methods={}, forwards={})
                for m in spec["methods"]:
                    state["methods"][m] = setup_method(m, spec, spec.get("adapter"))
                base = build_model(spec)
                unmerged = peft_model(build_model(spec), spec, spec.get("adapter"))
                merged = peft_model(build_model(spec), spec, spec.get("adapter")).merge_and_unload()
                state["forwards"] = {"base": base, "unmerged": unmerged, "merged": merged.eval()}
                reply({"ok": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "versions": versions()})
            elif op == "step":
                model, opt = state["methods"][cmd["method"]]
                loss = None
                t0 = time.perf_counter()
                for _ in range(cmd["n"]):
                    loss = train_step(model, opt, state["batch"], state["labels"])
                loss = float(loss)
                reply({"ok": True, "sec": (time.perf_counter() - t0) / cmd["n"], "loss": loss})
            elif op == "forward":
                model = state["forwards"][cmd["which"]]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for _ in range(cmd["n"]):
                        out = model(**state["batch"]).logits
                reply({"ok": True, "sec": (time.perf_counter() - t0) / cmd["n"], "sum": float(out.sum())})
            elif op == "quit":
                reply({"ok": True})
                return
            else:
                reply({"ok": False, "error": f"unknown op {op}"})
        except Exception as e:  # report, keep serving
            import traceback

            reply({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})


def versions():
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "lora-pro-adamw", "safetensors", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv):
    if argv[:1] == ["--serve"]:
        serve()
        return
    if argv[:1] == ["--versions"]:
        print(json.dumps(versions()))
        return
    spec = json.loads(open(argv[0]).read())
    torch.manual_seed(spec.get("seed", 0))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = JOBS[spec["job"]](spec)
    result["versions"] = versions()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
