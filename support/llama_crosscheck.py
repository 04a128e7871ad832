"""train/llama.py against transformers on the real SmolLM2-135M-Instruct GGUF.

    python -m bench.llama_crosscheck             # prints the figures; --json PATH writes them too

Both sides load the same file (``train.assets.smollm2_gguf()``, Q4_1 with a Q8_0 embedding):
transformers' ``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`` and
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` in float32 on torch CPU, in the peers'
virtual environment (``.venv-peers``, made by ``python -m bench.peers --setup-only``; this script
pip-installs ``gguf`` there if it is missing), against `train.llama.load_gguf` and
`train.llama.load_tokenizer` in JAX here. Compared:

* token ids of 200 varied strings (ASCII, unicode, emoji, CJK, whitespace runs, digits, code,
  chat markup with special tokens) and of chat prompts through the template;
* logits on several prompts (the same ids on both sides), float32:
  ``rel = max|ours − theirs| / max|theirs|`` per prompt, and the argmax at every position;
* greedy generation of 32 new tokens, both with eos stopping (as ``generate`` defaults) and
  with eos disabled so all 32 tokens are compared;
* the HF path: transformers' GGUF-loaded model written as HF safetensors + ``config.json``
  (its state dict; ``save_pretrained`` refuses GGUF-loaded models) and its tokenizer, read by
  `train.llama.load_hf` / ``LlamaTokenizer.from_dir``: every weight equal to `load_gguf`'s
  (the Q/K un-permutation is done independently on each side).

The torch side is this same file run as ``python support/llama_crosscheck.py --torch-side SPEC``
in the peers' venv (it imports neither JAX nor lora_jax).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GEN_TOKENS = 32
QUESTION = "What is 12 plus 30?"
LOGIT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "12 + 30 = ",
]
CHATS = [
    [{"role": "user", "content": QUESTION}],
    [{"role": "user", "content": "Name three primary colours."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What colour is the sky on a clear day?"}],
]


def varied_strings(n: int = 200, seed: int = 0) -> list[str]:
    """`n` test strings: fixed hard cases first, then seeded mixtures of fragments."""
    fixed = [
        "", " ", "  ", "\n", "\t", "\r\n", "a", "Hello, world!", " Hello", "hello  world", "   leading",
        "trailing   ", "tabs\tand\nnewlines\n\n\nthree", "It's we're they'll I'd you've",
        "12345", "3.14159", "1,000,000", "2024-01-15T12:30:00Z", " 42 ", "x=1+2*3-4/5",
        "naïve café résumé", "Straße", "Ünïcödé", "Ελληνικά", "Русский текст", "日本語のテキスト", "中文字符",
        "한국어", "עברית", "العربية", "हिन्दी", "emoji 😀🎉👍🏽", "👨‍👩‍👧‍👦", "\u200b zero width", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "import numpy as np\nnp.zeros((3, 4))", "<html><body>Hi</body></html>", '{"key": [1, 2, {"a": null}]}',
        "SELECT * FROM t WHERE id = 7;", "#!/bin/bash\necho $HOME", "// comment\n/* block */",
        "<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
        "<|im_start|><|im_end|>", "<|im_start", "im_end|>", "<repo_name>x<file_sep>y",
        "What is 12 plus 30?", "The quick brown fox jumps over the lazy dog.", "ALL CAPS SENTENCE",
        "MiXeD cAsE", "don't", "U.S.A.", "e.g. i.e. etc.", "$100.00 €50 £30 ¥1000", "100%", "a—b–c",
        "“quotes” ‘single’ «guillemets»", "...", "!!!???", "~`@#$%^&*()_+-=[]{}|;':\",./<>?",
    ]
    fragments = [
        "the", " cat", " sat", " on", " mat", "12", " 30", "=", "+", " plus", "\n", "  ", "\t", "é", "ß",
        "你好", "🙂", "def", "(x)", ":", " return", "<|im_start|>", "<|im_end|>", "user", "assistant",
        "'s", "'ll", " 2025", "0.5", "-", "_", "__init__", "CamelCase", "snake_case", "  indented",
        "Привет", "Ω", "∑", "√2", "→", "1st", "2nd", " I", "'m", "http://example.com/a?b=c",
    ]
    rng = random.Random(seed)
    out = list(fixed)
    while len(out) < n:
        out.append("".join(rng.choice(fragments) for _ in range(rng.randint(1, 12))))
    return out[:n]


# ------------------------------------------------------------------------------------------------
# torch side (peers venv)


def torch_side(spec_path: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(spec.get("threads", 2))
    d, f = str(Path(spec["gguf"]).parent), Path(spec["gguf"]).name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = LlamaForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    res: dict = {"versions": {"torch": torch.__version__,
                              "transformers": __import__("transformers").__version__,
                              "gguf": __import__("importlib.metadata").metadata.version("gguf")}}
    res["string_ids"] = [tok(s, add_special_tokens=True)["input_ids"] for s in spec["strings"]]
    res["decoded"] = [tok.decode(ids) for ids in res["string_ids"]]
    res["chat_ids"] = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)) for m in spec["chats"]]
    logits = {}
    res["prompt_ids"] = []
    with torch.no_grad():
        prompts = [tok(p)["input_ids"] for p in spec["prompts"]] + res["chat_ids"][:1]
        for k, ids in enumerate(prompts):
            res["prompt_ids"].append(ids)
            logits[f"p{k}"] = model(torch.tensor([ids])).logits[0].numpy()
        gens, gens_full = [], []
        for ids in res["chat_ids"]:
            x = torch.tensor([ids])
            g = model.generate(x, max_new_tokens=spec["gen_tokens"], do_sample=False,
                               attention_mask=torch.ones_like(x))
            gens.append(g[0, len(ids):].tolist())
            model.generation_config.eos_token_id = None  # all gen_tokens tokens, past any eos
            g = model.generate(x, max_new_tokens=spec["gen_tokens"], min_new_tokens=0, do_sample=False,
                               attention_mask=torch.ones_like(x), eos_token_id=None, pad_token_id=0)
            model.generation_config.eos_token_id = tok.eos_token_id
            gens_full.append(g[0, len(ids):].tolist())
    res["generated"], res["generated_no_eos"] = gens, gens_full
    res["answer"] = tok.decode(gens[0], skip_special_tokens=True)
    np.savez(out / "torch_logits.npz", **logits)
    # save_pretrained refuses a GGUF-loaded model, so write what it would: config.json and a
    # safetensors state dict with HF key names (lm_head dropped when tied, as it does)
    from safetensors.torch import save_file

    hf_dir = out / "hf"
    hf_dir.mkdir(exist_ok=True)
    model.config.to_json_file(hf_dir / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, hf_dir / "model.safetensors")
    tok.save_pretrained(hf_dir)
    res["hf_dir"] = str(hf_dir)
    (out / "torch.json").write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------
# JAX side (this venv)


class PeersUnavailable(RuntimeError):
    """The peers' venv is missing, or lacks torch/transformers/gguf and gguf cannot be installed."""


def peers_python_with_gguf() -> Path:
    """The peers venv's python, with ``gguf`` installed there (pip-installed here if missing:
    the peers' set-up does not install it)."""
    # imported here, not at the top: the torch side runs this file as a script in the peers venv
    from support.peers import peers_python

    py = peers_python(check=False)
    if py is None:
        raise PeersUnavailable("no peers venv: run `python -m bench.peers --setup-only` first")
    if subprocess.run([str(py), "-c", "import torch, transformers"], capture_output=True).returncode:
        raise PeersUnavailable(f"{py} does not import torch and transformers: rerun "
                               "`python -m bench.peers --setup-only`")
    if subprocess.run([str(py), "-c", "import gguf"], capture_output=True).returncode:
        r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "gguf>=0.19"],
                           capture_output=True, text=True)
        if r.returncode:
            raise PeersUnavailable(f"could not pip-install gguf>=0.19 into the peers venv: "
                                   f"{(r.stderr or r.stdout).strip()[-500:]}")
    return py


def run_torch_side(script: Path, py: Path, work: Path, spec: dict, threads: int):
    """Run `script` ``--torch-side SPEC`` with the peers' `py` (`spec` written to ``work/spec.json``);
    returns what it left in `work`: ``torch.json`` (parsed) and ``torch_logits.npz`` (loaded)."""
    (work / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([str(py), str(Path(script).resolve()), "--torch-side", str(work / "spec.json")],
                       capture_output=True, text=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        raise RuntimeError(f"torch side failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads((work / "torch.json").read_text()), np.load(work / "torch_logits.npz")


def run(workdir: Path | None = None, *, threads: int = 2, verbose: bool = True) -> dict:
    """Run both sides and return the figures (see the module docstring)."""
    import jax.numpy as jnp

    from train import llama
    from train.assets import smollm2_gguf

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    gguf_path = smollm2_gguf()
    py = peers_python_with_gguf()
    tmp = tempfile.TemporaryDirectory(prefix="llama_crosscheck_") if workdir is None else None
    work = Path(tmp.name if tmp else workdir)
    work.mkdir(parents=True, exist_ok=True)
    strings = varied_strings()
    spec = {"gguf": str(gguf_path), "out": str(work), "strings": strings, "chats": CHATS,
            "prompts": LOGIT_PROMPTS, "gen_tokens": GEN_TOKENS, "threads": threads}
    say("torch side: transformers from the GGUF …")
    t0 = time.time()
    theirs, their_logits = run_torch_side(Path(__file__), py, work, spec, threads)
    say(f"torch side done in {time.time() - t0:.0f} s; JAX side …")

    res: dict = {"gguf": str(gguf_path), "versions": theirs["versions"]}
    tok = llama.load_tokenizer(gguf_path)
    ours_ids = [tok.encode(s) for s in strings]
    agree = [a == b for a, b in zip(ours_ids, theirs["string_ids"])]
    res["tokenizer"] = {"strings": len(strings), "equal": sum(agree),
                        "first_differences": [(strings[i], ours_ids[i], theirs["string_ids"][i])
                                              for i, ok in enumerate(agree) if not ok][:5],
                        "decode_round_trip": sum(tok.decode(i) == s for i, s in zip(ours_ids, strings)),
                        "decode_equal": sum(tok.decode(i) == d for i, d in zip(theirs["string_ids"], theirs["decoded"]))}
    our_chat = [tok.chat_ids(m) for m in CHATS]
    res["chat_template_ids_equal"] = [a == b for a, b in zip(our_chat, theirs["chat_ids"])]

    config, params = llama.load_gguf(gguf_path)
    model = llama.Llama(config)
    rels, argmax_equal = [], []
    for k, ids in enumerate(theirs["prompt_ids"]):
        ours = np.asarray(model.apply({"params": params}, jnp.asarray([ids]))[0])
        ref = their_logits[f"p{k}"]
        rels.append(float(np.abs(ours - ref).max() / np.abs(ref).max()))
        argmax_equal.append(bool((ours.argmax(-1) == ref.argmax(-1)).all()))
    res["logits"] = {"prompts": len(rels), "tokens": [len(i) for i in theirs["prompt_ids"]],
                     "max_rel_err": max(rels), "rel_err_per_prompt": rels, "argmax_equal": argmax_equal}

    gens = [llama.generate(model, params, [ids], GEN_TOKENS)[0].tolist() for ids in our_chat]
    gens_full = [llama.generate(model, params, [ids], GEN_TOKENS, eos_id=-1)[0].tolist() for ids in our_chat]
    # ours pads after eos; transformers' output stops there
    trim = [g[: g.index(config.eos_token_id) + 1] if config.eos_token_id in g else g for g in gens]
    res["generation"] = {
        "tokens": GEN_TOKENS, "equal_with_eos": [a == b for a, b in zip(trim, theirs["generated"])],
        "equal_32_no_eos": [a == b for a, b in zip(gens_full, theirs["generated_no_eos"])],
        "question": QUESTION, "answer_ours": tok.decode(trim[0], skip_special_tokens=True),
        "answer_transformers": theirs["answer"]}

    hf_config, hf_params = llama.load_hf(theirs["hf_dir"])
    import jax

    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, hf_params)
    res["hf_safetensors"] = {"config_equal": hf_config == config,
                             "max_abs_weight_diff": max(jax.tree.leaves(diffs))}
    hf_tok = llama.load_tokenizer(theirs["hf_dir"])
    res["hf_safetensors"]["tokenizer_equal"] = sum(hf_tok.encode(s) == i for s, i in zip(strings, ours_ids))
    if tmp is not None:
        tmp.cleanup()
    return res


def report(res: dict) -> str:
    t, lg, g, hf = res["tokenizer"], res["logits"], res["generation"], res["hf_safetensors"]
    lines = [
        f"SmolLM2-135M-Instruct Q4_1 GGUF: train/llama.py (JAX, float32) vs transformers "
        f"{res['versions']['transformers']} (torch {res['versions']['torch']}, CPU, float32), gguf {res['versions']['gguf']}",
        f"tokenizer: {t['equal']}/{t['strings']} strings give identical ids; decode round-trips "
        f"{t['decode_round_trip']}/{t['strings']}; decode equals transformers' {t['decode_equal']}/{t['strings']}",
        f"chat template ids equal: {res['chat_template_ids_equal']}",
        f"logits: {lg['prompts']} prompts ({lg['tokens']} tokens), max |ours−theirs|/max|theirs| = "
        f"{lg['max_rel_err']:.2e} (per prompt {', '.join(f'{r:.1e}' for r in lg['rel_err_per_prompt'])}); "
        f"argmax equal at every position: {lg['argmax_equal']}",
        f"greedy generation, {g['tokens']} new tokens: equal with eos stopping {g['equal_with_eos']}; "
        f"all {g['tokens']} with eos disabled {g['equal_32_no_eos']}",
        f"  {g['question']!r} → ours {g['answer_ours']!r} | transformers {g['answer_transformers']!r}",
        f"HF safetensors (transformers' GGUF-loaded state dict + config.json) via load_hf: config equal {hf['config_equal']}, "
        f"max |weight diff| vs load_gguf {hf['max_abs_weight_diff']:.1e}; tokenizer.json ids equal "
        f"{hf['tokenizer_equal']}/{t['strings']}",
    ]
    if t["first_differences"]:
        lines.append(f"first tokenizer differences: {t['first_differences']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-side", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="keep the torch side's files here")
    args = ap.parse_args(argv)
    if args.torch_side:
        torch_side(args.torch_side)
        return 0
    res = run(args.workdir, threads=args.threads)
    print(report(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
