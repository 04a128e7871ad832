"""What happens when an adapted or quantized weight must be formed in full, and the per-call
settings of `lora_jax.wrap` (strict mode, the dropout key).

A `LoRA` or `Quantized` value that meets a primitive with no factored rule is *materialised*: its
dense array (``w + scale·a@b``, or the dequantized blocks) is formed and the primitive runs on it.
That is always correct but costs what LoRA exists to avoid (a full weight, and a full weight
gradient), so it warns (`LoRAMaterializationWarning`) or, under ``wrap(fn, strict=True)``, raises
(`LoRAMaterializationError`). `fallback` is the quax ``default`` rule of both value types.

The settings live in context variables rather than arguments because quax calls the rules, not
`wrap`: a rule deep inside a traced function reads them from the context `wrap` set up.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import jax
import quax


class LoRAMaterializationWarning(UserWarning):
    """A LoRA weight was materialised (``w + scale·a@b``) because no factored rule applies."""


class LoRAMaterializationError(TypeError):
    """Raised instead of `LoRAMaterializationWarning` under ``wrap(fn, strict=True)``."""


NO_RULE = "which has no factored rule"

_STRICT = contextvars.ContextVar("lora_jax_strict", default=False)
_DROPOUT = contextvars.ContextVar("lora_jax_dropout", default=None)  # [key, counter] or None
_ADAPTER_IDS = contextvars.ContextVar("lora_jax_adapter_ids", default=None)  # (batch,) ints or None
_DEPTH = contextvars.ContextVar("lora_jax_wrap_depth", default=0)  # wrapped calls running now


@contextlib.contextmanager
def settings(*, strict: bool, dropout_key, adapter_ids=None):
    """The per-call settings of a wrapped function, for the rules that run inside it."""
    strict_token = _STRICT.set(strict)
    ids_token = _ADAPTER_IDS.set(adapter_ids)
    drop_token = _DROPOUT.set(None if dropout_key is None else [dropout_key, 0])
    depth_token = _DEPTH.set(_DEPTH.get() + 1)
    try:
        yield
    finally:
        _STRICT.reset(strict_token)
        _DROPOUT.reset(drop_token)
        _ADAPTER_IDS.reset(ids_token)
        _DEPTH.reset(depth_token)


def inside_wrap() -> bool:
    """Whether a function wrapped by `lora_jax.wrap` is running (being traced) now."""
    return _DEPTH.get() > 0


def adapter_ids():
    """The call's ``lora_adapter_ids`` (one adapter index per batch row, −1: the base model), or
    None when it was called without them."""
    return _ADAPTER_IDS.get()


def next_dropout_key():
    """A fresh key for one adapter's dropout mask, or None outside a call with ``lora_dropout_key``
    (evaluation). Keys are folded from the call's key by a counter, one per adapted product traced."""
    state = _DROPOUT.get()
    if state is None:
        return None
    key = jax.random.fold_in(state[0], state[1])
    state[1] += 1
    return key


def on_materialise(value, primitive: str | None, why: str = NO_RULE) -> None:
    """Warn (or raise, under strict mode) that `value` is formed in full for `primitive`.
    `value` says what that costs through its ``materialise_message(what, why)``."""
    what = f"primitive {primitive!r}" if primitive else "an operation"
    value.check_formable(what)
    msg = value.materialise_message(what, why)
    if _STRICT.get():
        raise LoRAMaterializationError(msg + " (strict=True)")
    warnings.warn(msg, LoRAMaterializationWarning, stacklevel=2)


def fallback(primitive, values, params, why: str = NO_RULE):
    """quax's ``default`` rule of `LoRA` and `Quantized`: materialise each of them among `values`
    (with the warning) and bind the primitive to plain arrays. Other values pass as they are."""
    for v in values:
        if isinstance(v, Formable):
            on_materialise(v, str(primitive), why)
    return primitive.bind(*[v.as_array() if isinstance(v, Formable) else v for v in values], **params)


class Formable(quax.ArrayValue):
    """A value of this library that stands for a dense array it can form (`LoRA`, `Quantized`).
    Subclasses say how (``as_array``) and what that costs (``materialise_message(what, why)``); the
    warning policy and quax's fallback are shared here. One shared ``default`` also lets quax take a
    primitive whose operands mix both kinds (distinct defaults would be a quax error)."""

    def as_array(self):
        raise NotImplementedError

    def materialise_message(self, what: str, why: str) -> str:
        raise NotImplementedError

    def check_formable(self, what: str) -> None:
        """Raise if this value has no dense array at all (a node of stacked adapters)."""

    def materialise(self):
        on_materialise(self, None)
        return self.as_array()

    @staticmethod
    def default(primitive, values, params):
        return fallback(primitive, values, params)


__all__ = ["Formable", "adapter_ids", "LoRAMaterializationError", "LoRAMaterializationWarning", "fallback",
           "inside_wrap", "next_dropout_key", "on_materialise", "settings"]
