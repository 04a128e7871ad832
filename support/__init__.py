"""What the tests and the benchmarks share (tests/ imports this package, never bench/):

* `transformer`: the benchmark model, a Flax Linen transformer encoder, and its train steps;
* `probes`: memory, FLOP and HLO probes of compiled steps (schedulers, saved residuals,
  memory_analysis, shard bytes, all-gathers);
* `fsdp`: one FSDP measurement of `train.classify`'s LoRA-Pro AdamW step;
* `timing`: the one timing helper (interleaved rounds, medians of per-round ratios);
* `behaviour`: the teacher–student task behind the LoRA-Pro behaviour benchmark;
* `accelerator`: the BERT classifier's step/grad/optimizer/forward measurements;
* `peers`, `peers_worker`, `peer_differences`: the PyTorch-peer harness (the peers' venv, the
  worker that runs the PyTorch side there, one case for both frameworks, the JAX steps) and the
  evidence of lora-pro-adamw's definition differences;
* `llama_crosscheck`: train/llama.py against transformers on the real SmolLM2 GGUF.
"""
