"""A trainer's learning-rate schedule and its optimizer for each method."""

from __future__ import annotations

import argparse

import optax

import lora_jax


def make_schedule(args, lr=None):
    """Linear warmup over ``warmup_ratio·steps``, then cosine decay to 0 at ``steps`` (or constant),
    peaking at ``--lr`` or at `lr` (which may be a traced scalar: a stacked run's per-adapter lr)."""
    if lr is not None:  # optax's schedules branch on their peak in Python: scale a unit-peak one
        unit = make_schedule(argparse.Namespace(**{**vars(args), "lr": 1.0}))
        return lambda count: lr * unit(count)
    lr = args.lr
    warm = int(round(args.warmup_ratio * args.steps))
    if args.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(args.steps, warm + 1), end_value=0.0)


def make_optimizer(method: str, schedule, weight_decay: float, compute_dtype=None, clip_norm: float = 0.0,
                   loraplus_ratio: float = 16.0):
    """The method's optimizer: AdamW for ``full``/``probe``/``lora``/``dora``; ``lora-pro`` chains
    `lora_jax.lora_pro` before AdamW; ``lora-pro-adamw`` is `lora_jax.lora_pro_adamw` (non-LoRA
    leaves get AdamW inside it); ``lora-plus`` is `lora_jax.loraplus` of AdamW (b's steps times
    `loraplus_ratio`); ``riemannian`` chains `lora_jax.riemannian` (λ 1e-2) before AdamW. `compute_dtype` is LoRA-Pro's (float32 by default; float64 for a
    float64 model, so that nothing in the step rounds to float32). ``clip_norm > 0`` puts
    `optax.clip_by_global_norm` first: LoRA-Pro then adjusts the clipped LoRA gradients, which for
    the efficient mode equals clipping the adjusted ones by the raw gradients' norm (the
    adjustment is linear), as the reference does."""
    if method == "lora-pro-adamw":
        tx = lora_jax.lora_pro_adamw(schedule, weight_decay=weight_decay, compute_dtype=compute_dtype)
    else:
        tx = optax.adamw(schedule, weight_decay=weight_decay)
        if method == "lora-pro":
            tx = optax.chain(lora_jax.lora_pro(compute_dtype=compute_dtype), tx)
        elif method == "riemannian":
            tx = optax.chain(lora_jax.riemannian(compute_dtype=compute_dtype), tx)
        elif method == "lora-plus":
            tx = lora_jax.loraplus(tx, loraplus_ratio)
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm > 0 else tx
