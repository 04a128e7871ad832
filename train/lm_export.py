"""A trained `Llama` out to the tools people serve with: a merged Hugging Face directory and GGUF.

* `merged_weights(params, pairs=None)`: the plain float tree a server needs — LoRA/DoRA nodes
  merged (`lora_jax.merge`), `lora_jax.Quantized` leaves (``--base q4``) dequantized, and with
  ``pairs=dict(scale=alpha / rank, ...)`` sibling factor leaves (Qwix's ``kernel_lora_a``/
  ``kernel_lora_b`` on this Linen model, `lora_jax.paired` trees) folded in by
  `lora_jax.merge_pairs` (its keywords). Both writers take `pairs` too, and refuse a tree with
  leaves they would not write (unmerged factors would otherwise be dropped without a word).
* `write_hf(dir, params, config, tokenizer)`: ``config.json`` (``LlamaForCausalLM``),
  ``model.safetensors`` (HF key names, Linear weights (out, in); in the params' dtype or `dtype`),
  ``tokenizer.json`` + ``tokenizer_config.json`` (special tokens, chat template) and
  ``generation_config.json``: what ``transformers.AutoModelForCausalLM.from_pretrained(dir)``,
  vLLM/TGI and `train.llama.load_hf` read.
* `write_gguf(path, params, config, source)`: a llama.cpp GGUF of architecture ``llama`` with every
  metadata key of the `source` GGUF carried over (hyper-parameters, tokenizer, chat template;
  ``general.file_type`` set to what is written), ``attn_q``/``attn_k`` rows permuted back to
  ggml's RoPE order (`train.llama.permute_qk_rows`, the inverse of what `load_gguf` undid), Linear
  weights (out, in) and tensor names as llama.cpp's converter writes them. `qtype`: ``F32``;
  ``F16`` (2-D weights half precision, norms F32, as llama.cpp's ``--outtype f16``); ``Q8_0``
  (2-D weights in Q8_0 blocks of 32 along the input axis, `gguf.quants.quantize`; norms F32, as
  llama.cpp's ``--outtype q8_0``). llama.cpp, Ollama and LM Studio load it, and so do
  transformers' GGUF loader and `train.llama.load_gguf`.

A GGUF needs its tokenizer as GGUF metadata; it is carried over from the source GGUF, so
`write_gguf` needs one (a model loaded from a HF directory: write the HF directory and convert it
with llama.cpp's ``convert_hf_to_gguf.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import processors

import lora_jax
from .gguf_tokenizer import LlamaTokenizer
from .llama import LlamaConfig, gguf_key_map, hf_key_map, permute_qk_rows

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
GGUF_TYPES = {"F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
              "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


class ExportError(ValueError):
    """A parameter tree or source that cannot be written in the asked format."""


def merged_weights(params, pairs: dict | None = None) -> dict:
    """`params` as plain arrays on the host: LoRA nodes merged, quantized leaves dequantized
    (float32), sibling factor pairs merged with ``lora_jax.merge_pairs(tree, **pairs)``."""
    tree = lora_jax.merge(params)
    if pairs is not None:
        tree = lora_jax.merge_pairs(tree, **pairs)
    return jax.tree.map(lambda x: np.asarray(x.dequantize() if lora_jax.is_quantized(x) else x), tree,
                        is_leaf=lora_jax.is_quantized)


def _check_all_written(params, paths, where: str) -> None:
    """Refuse leaves of `params` outside `paths` (what the format writes)."""
    root = params.get("params", params) if isinstance(params, dict) else params
    leaves = jax.tree_util.tree_flatten_with_path(root, is_leaf=lambda x: lora_jax.is_lora(x) or lora_jax.is_quantized(x))[0]
    have = {tuple(str(getattr(k, "key", k)) for k in kp) for kp, _ in leaves}
    extra = sorted("/".join(p) for p in have - set(paths))
    if extra:
        hint = (" — factor leaves of Qwix or lora_jax.paired: pass pairs=dict(scale=alpha / rank) to merge them"
                if any("lora" in e for e in extra) else "")
        raise ExportError(f"{where}: {len(extra)} leaves are not weights of the Llama model and would be left "
                          f"out: {extra[:6]}{hint}")


def _leaf(params: dict, path: tuple[str, ...], where: str) -> np.ndarray:
    node = params.get("params", params) if isinstance(params, dict) else params
    for p in path:
        if not isinstance(node, dict) or p not in node:
            raise ExportError(f"{'/'.join(path)} missing from the tree ({where})")
        node = node[p]
    if lora_jax.is_lora(node) or lora_jax.is_quantized(node) or not hasattr(node, "shape"):
        raise ExportError(f"{'/'.join(path)} is not a plain array: pass merged_weights(params)")
    return np.asarray(node)


def hf_state_dict(params, config: LlamaConfig, dtype=None) -> dict[str, np.ndarray]:
    """A plain `Llama` tree (`merged_weights`) as a ``LlamaForCausalLM`` state dict: HF key names
    (`train.llama.hf_key_map`, the inverse of `load_hf`), Linear weights transposed back to (out,
    in), cast to `dtype` (a NumPy/ml_dtypes dtype; default: each array's own)."""
    _check_all_written(params, [p for p, _ in hf_key_map(config).values()], "hf_state_dict")
    out = {}
    for key, (path, transpose) in hf_key_map(config).items():
        x = _leaf(params, path, "hf_state_dict")
        x = x.T if transpose else x
        out[key] = np.ascontiguousarray(x.astype(dtype) if dtype is not None else x)
    return out


def hf_config(config: LlamaConfig, dtype: str) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` (the fields `LlamaConfig.from_hf_dict` reads back)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "initializer_range": config.initializer_range,
        "dtype": dtype, "use_cache": True,
    }


def _dtype_name(params) -> str:
    dts = {np.asarray(x).dtype for x in jax.tree.leaves(params)}
    names = {n for n, d in DTYPES.items() if np.dtype(d) in dts}
    return names.pop() if len(names) == 1 else "float32"


def write_tokenizer(directory: Path, tok: LlamaTokenizer, config: LlamaConfig) -> None:
    """``tokenizer.json`` (a bos-adding post-processor where the checkpoint adds bos) and
    ``tokenizer_config.json`` with the special tokens and chat template."""
    t = tok.tokenizer
    name = lambda i: None if i is None else t.id_to_token(int(i))
    if tok.add_bos and tok.bos_id is not None:
        t = type(t).from_str(t.to_str())  # a copy: the caller's tokenizer keeps its post-processor
        bos = name(tok.bos_id)
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                         special_tokens=[(bos, int(tok.bos_id))])
    t.save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
           "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
           "unk_token": name(tok.unk_id), "add_bos_token": bool(tok.add_bos), "add_eos_token": bool(tok.add_eos),
           "clean_up_tokenization_spaces": False}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def write_hf(directory, params, config: LlamaConfig, tokenizer: LlamaTokenizer | None, *,
             dtype: str | None = None, pairs: dict | None = None) -> Path:
    """Write `params` (adapted or plain; merged here, `pairs` as in `merged_weights`) as a HF
    ``LlamaForCausalLM`` directory; `dtype` one of `DTYPES` (default: the params' own, float32
    where mixed)."""
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    plain = merged_weights(params, pairs)
    dtype = dtype or _dtype_name(plain)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(plain, config, DTYPES[dtype]), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))
    if tokenizer is not None:
        write_tokenizer(out, tokenizer, config)
    return out


def _gguf_tensor(name: str, w: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The data and type stored for tensor `name` (HF layout (out, in), float32)."""
    if w.ndim == 1 or qtype == "F32":
        return np.ascontiguousarray(w, np.float32), gguf.GGMLQuantizationType.F32
    if qtype == "F16":
        return np.ascontiguousarray(w, np.float16), gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if w.shape[-1] % block:
        raise ExportError(f"{name}: rows of {w.shape[-1]} values are not whole Q8_0 blocks of {block}; "
                          "write F16 or F32")
    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), gguf.GGMLQuantizationType.Q8_0), \
        gguf.GGMLQuantizationType.Q8_0


def write_gguf(path, params, config: LlamaConfig, source, *, qtype: str = "F32", pairs: dict | None = None) -> Path:
    """Write `params` (adapted or plain; merged here, `pairs` as in `merged_weights`) as a GGUF file
    with `source`'s metadata (the GGUF the model was loaded from: its tokenizer and chat template
    travel) — see the module doc."""
    if qtype not in GGUF_TYPES:
        raise ExportError(f"GGUF type {qtype!r}: one of {', '.join(GGUF_TYPES)}")
    source = Path(source)
    if source.suffix != ".gguf" or not source.is_file():
        raise ExportError(f"a GGUF carries its tokenizer as metadata, taken from the source GGUF; {source} is "
                          "not one (write a HF directory instead and convert it with llama.cpp's "
                          "convert_hf_to_gguf.py)")
    reader = gguf.GGUFReader(str(source))
    if reader.fields["general.architecture"].contents() != "llama":
        raise ExportError(f"{source}: architecture {reader.fields['general.architecture'].contents()!r}, not llama")
    plain = merged_weights(params, pairs)
    keymap = gguf_key_map(config)
    _check_all_written(plain, [p for p, _ in keymap.values()], "write_gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # the writer's own, and the one that changes
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(GGUF_TYPES[qtype][1])
    for name, (tree_path, linear) in keymap.items():
        w = _leaf(plain, tree_path, "write_gguf").astype(np.float32)
        w = w.T if linear else w
        if name.endswith("attn_q.weight"):
            w = permute_qk_rows(w, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = permute_qk_rows(w, config.num_key_value_heads)
        data, kind = _gguf_tensor(name, w, qtype)
        writer.add_tensor(name, data, raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


__all__ = ["DTYPES", "ExportError", "GGUF_TYPES", "hf_config", "hf_state_dict", "merged_weights", "write_gguf",
           "write_hf", "write_tokenizer"]
