"""train.lm's exports against transformers and PEFT on the real SmolLM2-135M-Instruct.

    python -m bench.lm_export            # prints the figures, writes bench/results/lm_export.json
                                         # and its section of bench/RESULTS.md

JAX side (here): ``train.lm --model smollm2 --method lora`` for a few steps with ``--export-peft``,
``--export-merged`` and ``--export-gguf`` (F32), and a second GGUF in Q8_0 written from the same
trained tree; the trained tree itself is restored from the run's last checkpoint (its trainable
half, onto a fresh build's frozen half), so "ours" does not come from any export.

Torch side (this file run as a script in the peers' venv, ``--torch-side SPEC``; it imports
neither JAX nor lora_jax), in float32 on CPU:

* ``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`` of the source GGUF +
  ``peft.PeftModel.from_pretrained(model, <--export-peft dir>)``: logits on 5 chat prompts and
  greedy replies (eos disabled, every token compared), against our adapted model's;
* ``AutoModelForCausalLM.from_pretrained(<--export-merged dir>)`` and the same with
  ``gguf_file=<--export-gguf file>``: logits against our merged model's; the F32 GGUF is also
  read back by `train.llama.load_gguf` here (logits and weights), and the Q8_0 one's error reported;
* a PEFT-trained adapter: ``get_peft_model`` (r 4, α 8, rsLoRA, the seven projections as PEFT's
  suffix names), two AdamW steps on two chat sequences, ``save_pretrained``; we import it
  (`train.peft_format.import_peft` onto `load_gguf`'s params) and compare logits with PEFT's, and
  export it again (`export_peft`): the round trip must give PEFT's tensors bit for bit.

``rel = max|ours − theirs| / max|theirs|`` per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Serving what you trained: train.lm's exports in transformers and PEFT (SmolLM2)"
GEN_TOKENS = 16
STEPS = 4
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------
# torch side (peers venv)


def _greedy(model, ids, n):
    """`n` greedy tokens after `ids` (full forward each step: no cache, no eos stopping)."""
    import torch

    x = torch.tensor([ids])
    out = []
    for _ in range(n):
        nxt = int(model(x).logits[0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def torch_side(spec_path: str) -> None:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(spec.get("threads", 2))
    src = Path(spec["gguf"])
    res: dict = {"versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                              "peft": peft.__version__}}
    logits = {}

    def base():
        return LlamaForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()

    def forward(name, model, gen=False):
        with torch.no_grad():
            for k, ids in enumerate(spec["prompts"]):
                logits[f"{name}_p{k}"] = model(torch.tensor([ids])).logits[0].numpy()
            if gen:
                res[f"{name}_greedy"] = [_greedy(model, ids, spec["gen_tokens"]) for ids in spec["prompts"]]

    forward("peft", peft.PeftModel.from_pretrained(base(), spec["peft_dir"]).eval(), gen=True)
    forward("merged_hf", AutoModelForCausalLM.from_pretrained(spec["merged_dir"], dtype=torch.float32).eval())
    g = Path(spec["gguf_f32"])
    forward("merged_gguf", AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name,
                                                                dtype=torch.float32).eval())
    g = Path(spec["gguf_q8"])
    forward("merged_q8", AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name,
                                                              dtype=torch.float32).eval())

    # a PEFT-trained adapter, for the import
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=PEFT_TARGETS, lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base(), cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    batch = torch.tensor(spec["train_batch"])
    pm.train()
    for _ in range(2):
        loss = pm(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(spec["peft_trained_dir"])
    forward("peft_trained", pm)
    np.savez(out / "torch_logits.npz", **logits)
    (out / "torch.json").write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------
# JAX side


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def lm_argv(work: Path, steps: int = STEPS) -> list[str]:
    """The `train.lm` run whose adapter is exported."""
    return ["--model", "smollm2", "--method", "lora", "--rank", "8", "--alpha", "16", "--steps", str(steps),
            "--batch-size", "4", "--lr", "3e-3", "--train-limit", "32", "--eval-limit", "2", "--max-new-tokens", "8",
            "--eval-batch-size", "2", "--warmup-ratio", "0", "--out", str(work / "runs"), "--name", "export",
            "--overwrite", "--quiet", "--no-plot", "--export-peft", str(work / "peft"),
            "--export-merged", str(work / "merged"), "--export-gguf", str(work / "merged-f32.gguf")]


def trained_tree(argv: list[str], run_dir: Path):
    """(config, adapted tree, tokenizer) of a finished `train.lm` run: its last checkpoint's
    trainable half (restored with the optimizer state's structure) on a fresh build's frozen half."""
    import lora_jax
    from train import lm
    from train.checkpoint import Checkpointer

    args = lm.parse_args(argv)
    setup = lm.build(args, lm.resolve_model(args.model))
    ckpt = Checkpointer(run_dir / "ckpt", every=args.steps)
    (tr, _), _ = ckpt.restore((setup.trainable, setup.optimizer.init(setup.trainable)))
    ckpt.close()
    return setup.model.config, lora_jax.combine(tr, setup.frozen), setup.tokenizer


def run(workdir: Path | None = None, threads: int = 2, verbose: bool = True) -> dict:
    import jax
    import jax.numpy as jnp

    import lora_jax
    from support.llama_crosscheck import peers_python_with_gguf, run_torch_side
    from train import arith, lm, llama, lm_export, peft_format
    from train.assets import smollm2_gguf

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    py = peers_python_with_gguf()
    tmp = tempfile.TemporaryDirectory(prefix="lm_export_") if workdir is None else None
    work = Path(tmp.name if tmp else workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()

    t0 = time.time()
    argv = lm_argv(work)
    summary = lm.main(argv)
    say(f"train.lm: {STEPS} steps and the exports in {time.time() - t0:.0f} s")
    config, tree, tok = trained_tree(argv, Path(summary["run_dir"]))
    lm_export.write_gguf(work / "merged-q8_0.gguf", tree, config, src, qtype="Q8_0")
    model = llama.Llama(config)
    probs = arith.problems("test", 5, 0)
    prompts = [arith.prompt_ids(tok, p) for p in probs]
    train_batch = [arith.prompt_ids(tok, p)[:24] for p in arith.problems("train", 2, 0)]
    train_batch = [x + [tok.eos_id] * (24 - len(x)) for x in train_batch]

    spec = {"gguf": str(src), "out": str(work), "threads": threads, "prompts": prompts, "gen_tokens": GEN_TOKENS,
            "peft_dir": summary["peft_dir"], "merged_dir": summary["merged_dir"], "gguf_f32": summary["gguf_file"],
            "gguf_q8": str(work / "merged-q8_0.gguf"), "train_batch": train_batch,
            "peft_trained_dir": str(work / "peft-trained")}
    say("torch side: PEFT, the merged HF directory, the merged GGUFs, a PEFT-trained adapter …")
    t1 = time.time()
    theirs, tl = run_torch_side(Path(__file__), py, work, spec, threads)
    say(f"torch side done in {time.time() - t1:.0f} s")

    def logits_of(params):
        return [np.asarray(model.apply({"params": params}, jnp.asarray([ids]))[0]) for ids in prompts]

    def against(name, ours):
        rels = [rel(o, tl[f"{name}_p{k}"]) for k, o in enumerate(ours)]
        same = [bool((o.argmax(-1) == tl[f"{name}_p{k}"].argmax(-1)).all()) for k, o in enumerate(ours)]
        return {"max_rel_err": max(rels), "rel_err_per_prompt": rels, "argmax_equal": same}

    fwd = lora_jax.wrap(model.apply)  # the adapted model, run factored as train.lm runs it
    ours_adapted = [np.asarray(fwd({"params": tree}, jnp.asarray([ids]))[0]) for ids in prompts]
    merged = lm_export.merged_weights(tree)
    ours_merged = logits_of(merged)
    greedy = [llama.generate(model, tree, [ids], GEN_TOKENS, eos_id=-1)[0].tolist() for ids in prompts]
    res: dict = {"versions": theirs["versions"], "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
                 "train_lm": {k: summary[k] for k in ("steps", "eval_acc", "trainable_params") if k in summary}}
    res["peft_export"] = {**against("peft", ours_adapted), "greedy_tokens": GEN_TOKENS,
                          "greedy_equal": [a == b for a, b in zip(greedy, theirs["peft_greedy"])],
                          "reply_ours": tok.decode(greedy[0], skip_special_tokens=True),
                          "reply_peft": tok.decode(theirs["peft_greedy"][0], skip_special_tokens=True)}
    res["merged_hf"] = against("merged_hf", ours_merged)
    res["merged_gguf_f32"] = against("merged_gguf", ours_merged)
    _, g32 = llama.load_gguf(summary["gguf_file"])
    res["merged_gguf_f32"]["reloaded_by_train_llama"] = {
        "max_abs_weight_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                   for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(merged))),
        "max_rel_logit_err": max(rel(o, m) for o, m in zip(logits_of(g32), ours_merged))}
    _, g8 = llama.load_gguf(work / "merged-q8_0.gguf")
    ours_q8 = logits_of(g8)
    res["merged_gguf_q8_0"] = {
        "vs_merged_f32": {"max_rel_err": max(rel(o, m) for o, m in zip(ours_q8, ours_merged)),
                          "argmax_agreement": float(np.mean(np.concatenate(
                              [o.argmax(-1) == m.argmax(-1) for o, m in zip(ours_q8, ours_merged)])))},
        "transformers_vs_train_llama": against("merged_q8", ours_q8)["max_rel_err"]}

    # the PEFT-trained adapter, imported
    _, base = llama.load_gguf(src)
    imported = peft_format.import_peft(spec["peft_trained_dir"], base, config)
    res["peft_import"] = against("peft_trained", [np.asarray(fwd({"params": imported}, jnp.asarray([ids]))[0])
                                                  for ids in prompts])
    again = peft_format.export_peft(work / "peft-again", imported, config, rslora=True)
    cfg0, t0_ = peft_format.read_peft(spec["peft_trained_dir"])
    cfg1, t1_ = peft_format.read_peft(again)
    res["peft_import"]["round_trip"] = {
        "same_keys": sorted(t0_) == sorted(t1_),
        "bitwise_equal": sorted(t0_) == sorted(t1_) and all(np.array_equal(t0_[k], t1_[k]) for k in t0_),
        "config_equal": all(cfg0[k] == cfg1[k] for k in ("r", "lora_alpha", "use_rslora", "use_dora"))}
    if tmp is not None:
        tmp.cleanup()
    return res


def report(res: dict) -> str:
    p, h, g, q, i = (res[k] for k in ("peft_export", "merged_hf", "merged_gguf_f32", "merged_gguf_q8_0", "peft_import"))
    v = res["versions"]
    return "\n".join([
        f"SmolLM2-135M-Instruct, train.lm --method lora ({res['train_lm'].get('steps')} steps); "
        f"transformers {v['transformers']}, peft {v['peft']}, torch {v['torch']} (CPU, float32); "
        f"{res['prompts']} chat prompts ({res['prompt_tokens']} tokens)",
        f"--export-peft → PeftModel.from_pretrained on LlamaForCausalLM(GGUF): logits rel err {p['max_rel_err']:.2e}, "
        f"argmax equal {p['argmax_equal']}; {p['greedy_tokens']} greedy tokens equal {p['greedy_equal']}",
        f"  reply ours {p['reply_ours']!r} | PEFT {p['reply_peft']!r}",
        f"--export-merged → AutoModelForCausalLM.from_pretrained: logits rel err {h['max_rel_err']:.2e}, "
        f"argmax equal {h['argmax_equal']}",
        f"--export-gguf F32 → transformers' GGUF loader: logits rel err {g['max_rel_err']:.2e}, argmax equal "
        f"{g['argmax_equal']}; → train.llama.load_gguf: max |weight diff| "
        f"{g['reloaded_by_train_llama']['max_abs_weight_diff']:.1e}, logits rel err "
        f"{g['reloaded_by_train_llama']['max_rel_logit_err']:.1e}",
        f"GGUF Q8_0: logits vs the F32 merged model rel err {q['vs_merged_f32']['max_rel_err']:.2e}, argmax "
        f"agreement {q['vs_merged_f32']['argmax_agreement']:.4f}; transformers vs train.llama on the Q8_0 file "
        f"{q['transformers_vs_train_llama']:.1e}",
        f"PEFT-trained adapter (r 4, α 8, rsLoRA, 2 AdamW steps) → import_peft: logits rel err vs PEFT "
        f"{i['max_rel_err']:.2e}, argmax equal {i['argmax_equal']}; export again: same keys "
        f"{i['round_trip']['same_keys']}, bitwise equal {i['round_trip']['bitwise_equal']}, config equal "
        f"{i['round_trip']['config_equal']}",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-side", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "lm_export.json",
                    help="write the figures here")
    ap.add_argument("--no-results", action="store_true", help="print only: no JSON, no RESULTS.md section")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="keep the files here")
    args = ap.parse_args(argv)
    if args.torch_side:
        torch_side(args.torch_side)
        return 0
    t0 = time.time()
    res = run(args.workdir, threads=args.threads)
    res["wall_s"] = round(time.time() - t0)
    text = report(res)
    print(text)
    if not args.no_results:
        import datetime
        import platform

        from support.runs import write_section

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        body = "\n".join(f"- {line}" if not line.startswith("  ") else f"  {line.strip()}" for line in text.splitlines())
        write_section(ROOT / "bench" / "RESULTS.md", SECTION, "\n".join([
            SECTION, "",
            f"`python -m bench.lm_export` ({datetime.date.today()}, {platform.machine()} CPU, {res['wall_s']} s; "
            f"what is compared: `support/lm_export_check.py`). rel = max|ours − theirs| / max|theirs| over "
            f"each prompt's logits, float32 on both sides; ours is the adapted tree restored from the run's "
            f"checkpoint, not read from any export.", "", body, ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
