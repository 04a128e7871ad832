"""Shardings of what LoRA adds to a sharded model: adapters and LoRA-Pro AdamW's moments.

A `LoRA` node's factors inherit the sharding of its weight axis by axis (`factor_shardings`)::

    w: (*batch, *in_axes, *out_axes)  spec (*sb, *si, *so)  (axes in w's own order)
    a: (*batch, *in_axes, r)          spec (*sb, *si, None)
    b: (*batch, r, *out_axes)         spec (*sb, None, *so)

so ``x @ a`` contracts over the same split as ``x @ w`` and ``t @ b`` lands in the same split as
``x @ w``'s output; the rank axis is small and never split. `lora_jax.apply` places the factors it
creates this way when `w` is a `jax.Array` with a `NamedSharding`; a caller may `jax.device_put`
them elsewhere afterwards (replicated adapters, say). LoRA-Pro AdamW's full-shape moments, kept in
matrix form ``(*batch, I, O)``, are sharded like `w` (`moment_sharding`, read off the factors, since
the optimizer sees only the trainable half).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def _spec(sharding, ndim: int) -> tuple | None:
    """The per-axis spec of a `NamedSharding` (padded to `ndim`), else None."""
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def array_sharding(x) -> NamedSharding | None:
    """`x`'s `NamedSharding` if it is a concrete `jax.Array` that has one (not under a trace)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        s = x.sharding
        return s if isinstance(s, NamedSharding) else None
    return None


def factor_shardings(w_sharding, ndim: int, roles: str) -> tuple[NamedSharding, NamedSharding] | None:
    """``(a_sharding, b_sharding)`` consistent with a weight sharded as `w_sharding` (see the
    module docstring), or None when `w_sharding` is not a `NamedSharding`."""
    spec = _spec(w_sharding, ndim)
    if spec is None:
        return None
    nb = ndim - len(roles)
    batch, tail = spec[:nb], spec[nb:]
    ins = tuple(s for s, role in zip(tail, roles) if role == "i")
    outs = tuple(s for s, role in zip(tail, roles) if role == "o")
    mesh = w_sharding.mesh
    return (NamedSharding(mesh, PartitionSpec(*batch, *ins, None)),
            NamedSharding(mesh, PartitionSpec(*batch, None, *outs)))


def _merged(specs: tuple):
    """Spec of several axes reshaped into one: the first axis' split survives the reshape only if
    the others are whole (row-major blocks stay contiguous)."""
    if not specs:
        return None
    if all(s is None for s in specs[1:]):
        return specs[0]
    return None


def moment_sharding(a, b, roles: str) -> NamedSharding | None:
    """Sharding of the ``(*batch, I, O)`` matrix form of a node's weight, from its factors: batch and
    input axes as `a`'s, output axes as `b`'s. None unless both are concrete arrays with
    `NamedSharding`s on one mesh. A group of several input (or output) axes keeps the split of its
    first axis when the rest are whole, else is left whole."""
    sa, sb = array_sharding(a), array_sharding(b)
    if sa is None or sb is None or sa.mesh != sb.mesh:
        return None
    spa, spb = _spec(sa, a.ndim), _spec(sb, b.ndim)
    n_in = roles.count("i")
    nb = a.ndim - 1 - n_in
    return NamedSharding(sa.mesh, PartitionSpec(*spa[:nb], _merged(spa[nb:nb + n_in]), _merged(spb[nb + 1:])))


__all__ = ["array_sharding", "factor_shardings", "moment_sharding"]
