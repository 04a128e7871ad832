"""lora_jax: LoRA as a pure parameter-tree transform, executed factored; LoRA-Pro as optax.

Modules, lowest layer first (each imports only modules listed before it):

* `_compat` — workarounds for pinned dependency versions, each with a test that says when it can go;
* `policy` — materialisation warnings, strict mode, the per-call settings, quax's fallback rule;
* `quant` — quantized frozen weights (`Quantized`, `quantize`);
* `node` — the `LoRA` node and its orientation (axis roles);
* `product` — the factored product and its hand-written VJP;
* `rules` — the quax rules; `wrapping` — `wrap`;
* `paths`, `sharding`, `layout`, `adapt`, `tree` — tree operations (`layout_of`, `apply`,
  `lora_ga_init`, `split`/`combine`/`merge`); `stacking` — several adapters in one tree;
* `gram` — the r×r Gram algebra, eigendecompositions in groups;
* `projection` — LoRA-Pro's matrix math; `preconditioning` — the Riemannian matrix math;
* `factor_pairs` — how the optimizers find adapter pairs and put results back;
* `pairs` — `paired` and `merge_pairs`: factors kept as sibling leaves (Qwix, NNX, Keras);
* `optimizers` — the optax transformations.
"""

# Adapting a parameter tree
from lora_jax.adapt import apply, default_roles, lora_ga_init, output_heads
from lora_jax.layout import layout_of
from lora_jax.node import LoRA, is_lora
from lora_jax.tree import combine, merge, split

# Running functions on adapted trees
from lora_jax.policy import LoRAMaterializationError, LoRAMaterializationWarning
from lora_jax.wrapping import wrap

# Several adapters on one base: mixed-adapter batches (`wrap`'s lora_adapter_ids), hot swaps
from lora_jax.stacking import num_adapters, put_adapter, stack, unstack

# QLoRA: quantized frozen weights
from lora_jax.quant import Quantized, is_quantized, quantize

# Optimizers (optax gradient transformations)
from lora_jax.optimizers import (LoraProAdamWState, add_decay_towards_base, lora_pro, lora_pro_adamw,
                                 loraplus, riemannian, scale_b, scale_by_lora_pro_adam)

# The same optimizers on LoRA factors kept as sibling leaves (Qwix / Tunix, Flax NNX, Keras)
from lora_jax.pairs import merge_pairs, paired

# Matrix-level math, on matrix-form factors a (…, I, r), b (…, r, O)
from lora_jax.preconditioning import precondition_matrices
from lora_jax.projection import adjust_matrices, equivalent_kernel_gradient, sylvester_x

__all__ = [
    "LoRA",
    "LoRAMaterializationError",
    "LoRAMaterializationWarning",
    "LoraProAdamWState",
    "Quantized",
    "add_decay_towards_base",
    "adjust_matrices",
    "apply",
    "combine",
    "default_roles",
    "equivalent_kernel_gradient",
    "is_lora",
    "is_quantized",
    "layout_of",
    "lora_ga_init",
    "lora_pro",
    "lora_pro_adamw",
    "loraplus",
    "merge",
    "merge_pairs",
    "num_adapters",
    "output_heads",
    "paired",
    "precondition_matrices",
    "put_adapter",
    "quantize",
    "riemannian",
    "scale_b",
    "scale_by_lora_pro_adam",
    "split",
    "stack",
    "sylvester_x",
    "unstack",
    "wrap",
]
