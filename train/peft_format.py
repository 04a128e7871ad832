"""LoRA adapters in PEFT's on-disk format, both ways, for the two architectures of `train/`: the
BERT `Classifier` (train/bert.py, as ``BertForSequenceClassification``) and the `Llama` decoder
(train/llama.py, as ``LlamaForCausalLM``). What differs between them is a `Mapping` (`mapping_for`
its config): our kernel paths → HF module paths, PEFT's task type, and the head PEFT keeps whole.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For a
model wrapped by PEFT, peft 0.21's ``save_pretrained`` writes (checked by running it; see
bench/RESULTS.md, "PEFT side by side"):

* ``base_model.model.<module>.lora_A.weight`` (r, in) and ``….lora_B.weight`` (out, r) for every
  adapted Linear, ``<module>`` being the HF module path (``bert.encoder.layer.0.attention.self.query``;
  ``model.layers.0.self_attn.q_proj``);
* for the classifier (``task_type="SEQ_CLS"``), ``base_model.model.classifier.weight`` (classes,
  hidden) and ``….bias`` for the head kept whole (``modules_to_save``; the adapter name and
  ``modules_to_save.`` are stripped on save); a causal LM (``"CAUSAL_LM"``) has no such head;
* for DoRA (``use_dora: true``) also ``….lora_magnitude_vector`` (out,) per adapted Linear: PEFT
  saves its ``lora_magnitude_vector[adapter].weight`` under that name, without ``.weight``;
* ``r``, ``lora_alpha``, ``rank_pattern``/``alpha_pattern`` for modules whose rank or alpha differ
  from the global ones, ``use_rslora`` (scale alpha/√r instead of alpha/r), ``target_modules``.

In this project's kernel orientation (a Linear weight W (out, in) is the kernel K = Wᵀ (in, out);
a LoRA node holds a (in, r), b (r, out), K = w + scale·a@b) that is ``lora_A.weight = aᵀ``,
``lora_B.weight = bᵀ``, ``scale = lora_alpha / r`` — the same delta: PEFT's ΔW = scale·B A =
scale·(a b)ᵀ; a DoRA node's ``m`` (out,) is PEFT's magnitude as it is (both the norm of
``W + scale·B A`` per output unit, over the input axis).

BERT: the HF names come from `train.bert.hf_key_map`; the Linen tree is that of `Classifier`
(``{"encoder": BertEncoder params, "head": {"kernel", "bias"}}``), HF's modules are those of
``BertForSequenceClassification`` (``bert.*`` and ``classifier``). Note that HF's classifier pools
with the tanh pooler on [CLS] — our ``pooling="pooler"``; adapters trained with ``"mean"`` or
``"cls"`` pooling are still valid encoder adapters, but HF's head sees a different vector.

Llama: the names come from `train.llama.hf_key_map` (``layers_i/self_attn/q_proj/kernel`` →
``model.layers.i.self_attn.q_proj``). `train.llama.load_gguf` already puts ``attn_q``/``attn_k``
rows back in HF's order (llama.cpp permutes them for ggml's RoPE), so the q/k adapters' output
columns are in HF's order too and go out as they are; a merged GGUF permutes the merged rows
again (`train.lm_export`). Adapters on the embedding or the LM head have no PEFT Linear here and
are refused.

`export_peft(dir, params, config)` writes a directory; `import_peft(dir, params, config)` puts the
adapters onto a plain parameter tree as `lora_jax.LoRA` nodes (and, for BERT, the saved head over
ours); `hf_state_dict(params, config)` is the whole BERT model as a
``BertForSequenceClassification`` state dict (NumPy), for handing identical weights to PyTorch
(the Llama one is `train.lm_export.hf_state_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from lora_jax import LoRA, is_lora
from . import llama
from .bert import BertConfig, hf_key_map

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ENCODER_MODULE = "bert"  # BertForSequenceClassification.base_model_prefix
HEAD_MODULE = "classifier"
HEAD = "head"


class PeftFormatError(ValueError):
    """A PEFT directory or parameter tree that cannot be converted."""


# --------------------------------------------------------------------------------------------------
# names


def module_map(config: BertConfig, with_pooler: bool = True) -> dict[tuple[str, ...], str]:
    """Our kernel path in the `Classifier` tree (``("encoder", "layer_0", "query", "kernel")``) →
    HF module path in ``BertForSequenceClassification`` (``"bert.encoder.layer.0.attention.self.query"``),
    for every Linear of the encoder (and the pooler with `with_pooler`)."""
    out = {}
    for key, (path, transpose) in hf_key_map(config, with_pooler=with_pooler).items():
        if transpose and key.endswith(".weight"):
            out[("encoder",) + tuple(path)] = f"{ENCODER_MODULE}.{key[:-len('.weight')]}"
    return out


def llama_module_map(config: llama.LlamaConfig) -> dict[tuple[str, ...], str]:
    """Our kernel path in the `Llama` tree (``("layers_0", "self_attn", "q_proj", "kernel")``) → HF
    module path in ``LlamaForCausalLM`` (``"model.layers.0.self_attn.q_proj"``), for the seven
    projections of every layer (the LM head, a Linear too, is left out: PEFT targets it only by
    name, and train.lm never adapts it)."""
    return {tuple(path): key[:-len(".weight")] for key, (path, transpose) in llama.hf_key_map(config).items()
            if transpose and key.startswith("model.layers.")}


@dataclasses.dataclass(frozen=True)
class Mapping:
    """How one architecture's parameter tree meets PEFT's names."""

    modules: dict[tuple[str, ...], str]  # our kernel path -> HF module path, every adaptable Linear
    task_type: str  # PEFT's task_type: the HF class the adapter is loaded onto
    model_class: str  # that class's name, for messages
    head: str | None = None  # our head subtree (a Linear kept whole: PEFT's modules_to_save), if any
    head_module: str | None = None  # its HF module name


def mapping_for(config) -> Mapping:
    """The `Mapping` of a `train.bert.BertConfig` (the classifier, pooler included) or a
    `train.llama.LlamaConfig` (the causal LM)."""
    if isinstance(config, BertConfig):
        return Mapping(module_map(config, with_pooler=True), "SEQ_CLS", "BertForSequenceClassification",
                       HEAD, HEAD_MODULE)
    if isinstance(config, llama.LlamaConfig):
        return Mapping(llama_module_map(config), "CAUSAL_LM", "LlamaForCausalLM")
    raise TypeError(f"no PEFT mapping for a {type(config).__name__} (BertConfig or LlamaConfig)")


def _get(tree, path):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _set(tree: dict, path, value) -> dict:
    """A copy of nested-dict `tree` with `path` set (only the dicts on the path are copied)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def _params(tree):
    return tree["params"] if isinstance(tree, dict) and set(tree) == {"params"} else tree


def _np(x) -> np.ndarray:
    """NumPy float32 (bf16/f16 widened), float64 kept as it is; other dtypes unchanged."""
    x = np.asarray(x)
    if x.dtype == np.float64 or not np.issubdtype(x.dtype, np.floating):
        return x
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# whole model → HF state dict


def hf_state_dict(params, config: BertConfig) -> dict[str, np.ndarray]:
    """A `Classifier` parameter tree (plain arrays: `lora_jax.merge` adapted trees first) as a
    ``BertForSequenceClassification`` state dict: ``bert.*`` from `hf_key_map` (Linear weights
    transposed back to (out, in)) and ``classifier.weight``/``.bias`` from the head. The pooler is
    included when the tree has one."""
    p = _params(params)
    if "encoder" not in p:
        raise PeftFormatError("expected a Classifier tree {'encoder': ..., 'head': ...}")
    with_pooler = "pooler" in p["encoder"]
    out = {}
    for key, (path, transpose) in hf_key_map(config, with_pooler=with_pooler).items():
        x = _get(p["encoder"], path)
        if x is None:
            raise PeftFormatError(f"encoder/{'/'.join(path)} missing from the tree")

        if is_lora(x) or not hasattr(x, "shape"):
            raise PeftFormatError(f"encoder/{'/'.join(path)} is not an array (lora_jax.merge the tree first)")
        x = _np(x)
        out[f"{ENCODER_MODULE}.{key}"] = np.ascontiguousarray(x.T if transpose else x)
    if HEAD in p:
        out[f"{HEAD_MODULE}.weight"] = np.ascontiguousarray(_np(p[HEAD]["kernel"]).T)
        out[f"{HEAD_MODULE}.bias"] = _np(p[HEAD]["bias"])
    return out


def hf_config_dict(config: BertConfig, num_labels: int | None = None) -> dict[str, Any]:
    """The HF ``config.json`` fields of `config` (plus ``num_labels``)."""
    d = dataclasses.asdict(config)
    if num_labels is not None:
        d["num_labels"] = int(num_labels)
    return d


# --------------------------------------------------------------------------------------------------
# export


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def adapter_tensors(params, config, *, head: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, per_module)``: PEFT's tensors for the LoRA nodes (and head) of `params`, and
    ``{hf module: (r, scale, dropout, is DoRA)}``. `params` may be the adapted tree or its trainable
    half; `config` a `BertConfig` or `LlamaConfig` (`mapping_for`)."""
    p = _params(params)
    mapping = mapping_for(config)
    found = {}

    leaves = jax.tree_util.tree_flatten_with_path(p, is_leaf=is_lora)[0]
    tensors: dict[str, np.ndarray] = {}
    for kp, leaf in leaves:
        path = tuple(str(getattr(k, "key", k)) for k in kp)
        if not is_lora(leaf):
            continue
        if path not in mapping.modules:
            raise PeftFormatError(f"LoRA node at {'/'.join(path)} has no HF module name (PEFT holds adapters on "
                                  f"{mapping.model_class}'s Linear layers only, e.g. "
                                  f"{'/'.join(next(iter(mapping.modules)))})")
        if leaf.roles != "io" or np.ndim(leaf.a) != 2:
            raise PeftFormatError(f"LoRA node at {'/'.join(path)}: roles {leaf.roles!r}, a {np.shape(leaf.a)}; "
                                  "only plain 2-D Linear adapters map onto PEFT's lora_A/lora_B"
                                  + (" (stacked adapters: lora_jax.unstack them and export each)"
                                     if leaf.num_adapters is not None else ""))
        mod = mapping.modules[path]
        a, b = _np(leaf.a), _np(leaf.b)
        tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = np.ascontiguousarray(a.T)  # (r, in)
        tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = np.ascontiguousarray(b.T)  # (out, r)
        if leaf.m is not None:
            tensors[f"{PEFT_PREFIX}{mod}.lora_magnitude_vector"] = _np(leaf.m)  # (out,)
        found[mod] = (int(a.shape[-1]), float(leaf.scale), float(leaf.dropout), leaf.m is not None)
    if not found:
        raise PeftFormatError("no LoRA node in the tree: nothing to export (full fine-tuning and the "
                              "linear probe have no adapters)")
    if head and mapping.head is not None and isinstance(p, dict) and p.get(mapping.head) is not None:
        hk, hb = _get(p, (mapping.head, "kernel")), _get(p, (mapping.head, "bias"))
        if hk is not None and hb is not None:
            tensors[f"{PEFT_PREFIX}{mapping.head_module}.weight"] = np.ascontiguousarray(_np(hk).T)
            tensors[f"{PEFT_PREFIX}{mapping.head_module}.bias"] = _np(hb)
    return tensors, found


def export_peft(directory, params, config, *, rslora: bool = False,
                base_model_name_or_path: str | None = None, head: bool = True,
                task_type: str | None = None) -> Path:
    """Write the LoRA nodes of `params` (a `Classifier` or `Llama` tree, adapted or its trainable
    half; `config` its `BertConfig` or `LlamaConfig`) as a PEFT adapter directory that
    ``peft.PeftModel.from_pretrained`` loads onto HF's ``BertForSequenceClassification`` (the head
    going to ``modules_to_save``: ``classifier``) or ``LlamaForCausalLM``. `task_type` defaults to
    the architecture's (``SEQ_CLS``, ``CAUSAL_LM``).

    Each node's rank r and ``scale`` give its ``lora_alpha = scale·r`` (``scale·√r`` with
    `rslora`, which must say how the adapters were built: a node only knows its scale). The most
    common (r, alpha) becomes ``r``/``lora_alpha``; other modules get ``rank_pattern``/
    ``alpha_pattern`` entries under their full module path. ``target_modules`` lists the full
    module paths adapted (exact: a PEFT suffix list such as ``["dense"]`` would also catch the pooler).
    """
    mapping = mapping_for(config)
    tensors, found = adapter_tensors(params, config, head=head)
    drops = {d for _, _, d, _ in found.values()}
    if len(drops) > 1:
        raise PeftFormatError(f"adapters with different dropout rates {sorted(drops)}: PEFT has one lora_dropout")
    doras = {dora for *_, dora in found.values()}
    if len(doras) > 1:
        raise PeftFormatError("DoRA and plain LoRA nodes in one tree: PEFT's use_dora is one flag for all")
    dora = doras.pop()
    if dora and drops != {0.0}:
        raise PeftFormatError(f"DoRA with lora_dropout {sorted(drops)}: PEFT applies the dropout to the DoRA "
                              f"part differently (see lora_jax.apply's dora), so the export would not be the "
                              f"same model")
    per = {m: (r, _number(s * (math.sqrt(r) if rslora else r))) for m, (r, s, *_) in found.items()}
    (r0, alpha0), _ = Counter(per.values()).most_common(1)[0]
    saves_head = mapping.head_module is not None and any(
        k.startswith(f"{PEFT_PREFIX}{mapping.head_module}.") for k in tensors)
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type or mapping.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": drops.pop(),
        "target_modules": sorted(found),
        "rank_pattern": {m: r for m, (r, _) in sorted(per.items()) if r != r0},
        "alpha_pattern": {m: a for m, (_, a) in sorted(per.items()) if a != alpha0},
        "use_rslora": bool(rslora),
        "modules_to_save": [mapping.head_module] if saves_head else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


# --------------------------------------------------------------------------------------------------
# import


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's lookup of rank_pattern/alpha_pattern (`peft.utils.other.get_pattern_key`): the first
    key, in order, with ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft(directory) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of a PEFT directory (keys as stored)."""
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file():
        raise PeftFormatError(f"{d} has no {CONFIG_NAME}")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    if (d / WEIGHTS_NAME).is_file():
        tensors = load_file(str(d / WEIGHTS_NAME))
    else:
        raise PeftFormatError(f"{d} has no {WEIGHTS_NAME} (a pickled adapter_model.bin is not read)")
    return cfg, tensors


def _lora_node(mod: str, ab: dict, w, *, r: int, scale: float, dropout: float, dora: bool, dtype) -> LoRA:
    """The node of HF module `mod` from its PEFT tensors `ab` on our kernel `w` (in, out)."""
    A, B = ab["lora_A"], ab["lora_B"]
    if A.shape != (r, w.shape[0]) or B.shape != (w.shape[1], r):
        raise PeftFormatError(f"{mod}: lora_A {A.shape}, lora_B {B.shape} do not fit the kernel "
                              f"{tuple(w.shape)} (in, out) at rank {r}")
    mag = None
    if dora:
        mag = ab["lora_magnitude_vector"]
        if mag.shape != (w.shape[1],):
            raise PeftFormatError(f"{mod}: lora_magnitude_vector {mag.shape} does not fit the kernel's "
                                  f"{w.shape[1]} outputs")
        mag = jnp.asarray(mag, dtype)
    return LoRA(w=w, a=jnp.asarray(A.T, dtype), b=jnp.asarray(B.T, dtype), scale=scale, roles="io",
                dropout=dropout, m=mag)


def _with_head(tree: dict, head: dict, mapping: Mapping) -> dict:
    """`tree` with the saved head (``modules_to_save``) over its own."""
    hname = mapping.head_module
    if set(head) != {"weight", "bias"}:
        raise PeftFormatError(f"{hname}: has {sorted(head)}, needs weight and bias")
    if mapping.head not in tree:
        raise PeftFormatError(f"the adapter saves a {hname} head but the tree has none")
    hk = tree[mapping.head]["kernel"]
    if head["weight"].T.shape != tuple(hk.shape):
        raise PeftFormatError(f"{hname}.weight {head['weight'].shape} does not fit the head kernel "
                              f"{tuple(hk.shape)} (num_classes differ?)")
    tree = _set(tree, (mapping.head, "kernel"), jnp.asarray(head["weight"].T, hk.dtype))
    return _set(tree, (mapping.head, "bias"), jnp.asarray(head["bias"], tree[mapping.head]["bias"].dtype))


def import_peft(directory, params, config, *, dtype=None):
    """`params` (a plain `Classifier` or `Llama` tree, e.g. from `train.bert.init_classifier` or
    `train.llama.load`; `config` its `BertConfig` or `LlamaConfig`) with the PEFT adapter in
    `directory` put on: each adapted Linear becomes a `lora_jax.LoRA` node (``a = lora_Aᵀ``,
    ``b = lora_Bᵀ``, ``scale = alpha/r`` or ``alpha/√r``, rank and alpha per module from
    ``rank_pattern``/``alpha_pattern``), and a saved ``classifier`` (``modules_to_save``) replaces
    the classifier's head. Returns the tree in the form it was given (``{"params": …}`` or bare).

    A DoRA adapter (``use_dora``) gives nodes with ``m`` = its ``lora_magnitude_vector``.

    Refused (`PeftFormatError`): trained biases, fan_in_fan_out, modules with no counterpart
    in the tree (e.g. pooler adapters when the tree has no pooler), unknown keys, shape mismatches.
    """
    mapping = mapping_for(config)
    cfg, tensors = read_peft(directory)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(f"peft_type {cfg.get('peft_type')!r}: only LORA adapters are read")
    dora = bool(cfg.get("use_dora", False))
    if cfg.get("fan_in_fan_out"):
        raise PeftFormatError(f"fan_in_fan_out adapters (GPT-2 Conv1D) do not apply to {mapping.model_class}")
    if cfg.get("bias", "none") != "none":
        raise PeftFormatError(f"bias={cfg['bias']!r}: trained biases are not read")
    wrapped = isinstance(params, dict) and set(params) == {"params"}
    p = _params(params)
    inv = {v: k for k, v in mapping.modules.items()}
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    head_key = re.compile(rf"{re.escape(mapping.head_module)}(?:\.modules_to_save(?:\.[^.]+)?)?\.(weight|bias)"
                          if mapping.head_module else r"(?!)")

    mods: dict[str, dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    unknown = []
    for key, x in tensors.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = (re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", k)
             or re.fullmatch(r"(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?", k))
        if m:
            mods.setdefault(m.group(1), {})[m.group(2)] = np.asarray(x)
        elif head_key.fullmatch(k):
            head[k.rsplit(".", 1)[1]] = np.asarray(x)
        else:
            unknown.append(key)
    if unknown:
        raise PeftFormatError(f"keys this reader does not know (for {mapping.model_class}): {unknown[:8]}")
    if not mods:
        raise PeftFormatError(f"{directory}: no lora_A/lora_B weights")
    out = p
    for mod, ab in sorted(mods.items()):
        need = {"lora_A", "lora_B", *(["lora_magnitude_vector"] if dora else [])}
        if set(ab) != need:
            raise PeftFormatError(f"{mod}: has {sorted(ab)}, needs {' and '.join(sorted(need))}"
                                  f"{' (use_dora is ' + str(dora).lower() + ')' if 'lora_magnitude_vector' in ab or dora else ''}")
        if mod not in inv:
            raise PeftFormatError(f"{mod}: no such Linear in this {mapping.model_class} (have e.g. "
                                  f"{sorted(inv)[:3]})")
        path = inv[mod]
        w = _get(out, path)
        if w is None:
            raise PeftFormatError(f"{mod}: the adapter adapts {'/'.join(path)} but the tree has none"
                                  + (" (build the Classifier with pooling='pooler')" if "pooler" in mod else ""))
        if is_lora(w):
            raise PeftFormatError(f"{'/'.join(path)} is already a LoRA node")
        r, alpha = int(_pattern_value(ranks, mod, r0)), float(_pattern_value(alphas, mod, alpha0))
        node = _lora_node(mod, ab, w, r=r, scale=alpha / (math.sqrt(r) if rslora else r), dropout=dropout,
                          dora=dora, dtype=dtype or jnp.float32)
        out = _set(out, path, node)
    if head:
        out = _with_head(out, head, mapping)
    return {"params": out} if wrapped else out


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "Mapping", "PeftFormatError", "adapter_tensors", "export_peft",
           "hf_config_dict", "hf_state_dict", "import_peft", "llama_module_map", "mapping_for", "module_map",
           "read_peft"]
