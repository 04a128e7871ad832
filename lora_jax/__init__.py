"""lora_jax: LoRA as a pure parameter-tree transform, executed factored; LoRA-Pro as optax."""

from lora_jax._wrap import LoRAMaterializationError, LoRAMaterializationWarning, wrap
from lora_jax.adapt import apply, default_roles
from lora_jax.layout import layout_of
from lora_jax.lora_pro import LoraProAdamWState, lora_pro, lora_pro_adamw
from lora_jax.loraplus import loraplus, scale_b
from lora_jax.node import LoRA, is_lora
from lora_jax.quant import Quantized, is_quantized, quantize
from lora_jax.riemannian import riemannian
from lora_jax.tree import combine, merge, split

__all__ = [
    "LoRA",
    "LoRAMaterializationError",
    "LoRAMaterializationWarning",
    "LoraProAdamWState",
    "Quantized",
    "apply",
    "combine",
    "default_roles",
    "is_lora",
    "is_quantized",
    "layout_of",
    "lora_pro",
    "lora_pro_adamw",
    "loraplus",
    "merge",
    "quantize",
    "riemannian",
    "scale_b",
    "split",
    "wrap",
]
