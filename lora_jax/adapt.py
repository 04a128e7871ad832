"""`apply`: turn targeted kernels of a parameter tree into `LoRA` nodes; `lora_ga_init`: the same
with LoRA-GA's gradient-based init."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.node import LoRA, factor_shapes, fan_in_out, is_lora
from lora_jax.paths import Selector, compile_selector, flatten_with_paths, lookup_pattern
from lora_jax.quant import is_quantized
from lora_jax.quant import quantize as _quantize
from lora_jax.sharding import array_sharding, factor_shardings

INITS = ("lora", "gaussian", "pissa", "olora")
LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")  # variant="peft"
LORA_GA_PAPER_SCALES = ("stable", "gd", "unit", "weightS")  # variant="paper"

_EMBEDDING = re.compile(r"(?i)(embed|embedding|wte|wpe)")
_NOT_KERNEL = re.compile(r"(?i)(bias|scale|norm)")
_CONV = re.compile(r"(?i)conv")
_OUTPUT_HEAD = re.compile(r"(?i)(^|/)lm_head(/|$)")


def default_roles(path: str, shape) -> str:
    """Axis roles when `layout` says nothing (see `lora_jax.node` for what roles mean).

    * a 2-D kernel: ``"io"`` (in, out), as Flax's Dense stores it;
    * a conv kernel (a path component containing "conv"): every axis but the last is an input
      axis (spatial and input channels), the last the output channels;
    * any other kernel with 3 or more axes: a ValueError. Its shape cannot tell a scan-stacked
      Dense (L, in, out) from a DenseGeneral (d_model, heads, head_dim), an einsum weight
      (heads, d_model, head_dim) or a GQA key kernel (d_model, kv_heads, head_dim), and a wrong
      guess is a silently wrong adapter. `lora_jax.layout_of` reads the roles from the model.
    """
    ndim = len(shape)
    parts = path.split("/")
    if ndim >= 3 and any(_CONV.search(p) for p in parts[:-1]):
        return "i" * (ndim - 1) + "o"
    if ndim >= 3:
        raise ValueError(_ambiguous_message([f"{path!r} {tuple(shape)}"]))
    return "io"


def _ambiguous_message(kernels: list[str]) -> str:
    return (f"cannot tell the axis roles of kernels with 3 or more axes by name or shape: "
            f"{', '.join(kernels)} (a scan-stacked Dense (L, in, out), a DenseGeneral "
            f"(d_model, heads, head_dim) and an einsum weight look alike). Pass "
            f"layout=lora_jax.layout_of(fn, params, *args), which reads them from how fn uses each "
            f"weight, or layout={{regex: roles}}, e.g. layout={{r'query/kernel$': 'io'}} for "
            f"scan-stacked Dense kernels or 'ioo' for a DenseGeneral (d_model, heads, head_dim)")


def _check_roles(roles: str, shape, path: str) -> str:
    if not isinstance(roles, str) or set(roles) - {"i", "o"} or "i" not in roles or "o" not in roles:
        raise ValueError(f"layout for {path!r} must be a string of 'i'/'o' with at least one of each, "
                         f"got {roles!r}")
    if len(roles) > len(shape):
        raise ValueError(f"layout {roles!r} for {path!r} has more axes than its kernel {tuple(shape)}")
    return roles


def _roles(path: str, shape, layout) -> str | None:
    """The layout entry for `path`, else `default_roles`; None where those refuse to guess."""
    roles = lookup_pattern(layout, path, None)
    if roles is not None:
        return roles
    try:
        return default_roles(path, shape)
    except ValueError:
        return None


def _rank(path: str, shape, roles: str, rank, rank_pattern, per_rank: int = 1) -> int:
    """The rank for `path`: its `rank_pattern` entry (which must fit), else `rank` capped at
    min(in, out) // per_rank (LoRA-GA takes 2r singular vectors of the gradient: per_rank 2)."""
    explicit = lookup_pattern(rank_pattern, path, None)
    r = rank if explicit is None else explicit
    fan_in, fan_out = fan_in_out(shape, roles)
    limit = min(fan_in, fan_out) // per_rank
    valid = isinstance(r, (int, np.integer)) and 0 < r
    if valid and explicit is None and limit >= 1:  # the global rank adapts to small kernels
        return int(min(r, limit))
    if not valid or r > limit:
        bound = "min(in, out)" if per_rank == 1 else f"min(in, out) // {per_rank}"
        why = "" if per_rank == 1 else (f"; LoRA-GA takes {per_rank}r singular vectors of the "
                                        "gradient (exclude kernels too small for it)")
        raise ValueError(f"rank {r!r} for {path!r} must be an int in [1, {bound}] = "
                         f"[1, {limit}] (kernel {tuple(shape)}, roles {roles!r}){why}")
    return int(r)


def _is_float_array(leaf) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _default_target(path: str, leaf) -> bool:
    name = path.rsplit("/", 1)[-1]
    return (_is_float_array(leaf) and np.ndim(leaf) >= 2 and not _EMBEDDING.search(path)
            and not _NOT_KERNEL.search(name))


def output_heads(params) -> list[str]:
    """Paths of the kernels that project onto the vocabulary, which default targets leave out (as
    PEFT's ``target_modules="all-linear"`` leaves out the output layer): a kernel under an
    ``lm_head`` path component, and a 2-D kernel (d, V) whose V, larger than d, is the row count of
    an embedding table (V, d) of the same tree (an untied output projection by any name)."""
    leaves, _ = flatten_with_paths(params, is_leaf=lambda x: is_lora(x) or is_quantized(x))
    kernels = [(p, tuple(np.shape(leaf))) for p, leaf in leaves
               if _is_float_array(leaf) and np.ndim(leaf) >= 2]
    tables = {shape for p, shape in kernels if len(shape) == 2 and _EMBEDDING.search(p)}
    return [p for p, shape in kernels if not _EMBEDDING.search(p) and (
        _OUTPUT_HEAD.search(p) or (len(shape) == 2 and shape[1] > shape[0] and shape[::-1] in tables))]


def apply(
    params,
    rank: int = 8,
    *,
    alpha: float | None = None,
    targets: Selector = None,
    exclude: Selector = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layout: dict[str, str] | None = None,
    rslora: bool = False,
    init: str = "lora",
    dropout: float = 0.0,
    adapter_dtype=jnp.float32,
    quantize: str | None = None,
    dora: bool = False,
    key: jax.Array | None = None,
):
    """Return `params` with each targeted kernel replaced by a `LoRA` node.

    Args:
      params: any pytree of arrays (Linen params, an NNX `State`, an Equinox module).
      rank: adapter rank r (overridden per path by `rank_pattern`). A kernel with
        ``min(in, out) < rank`` (a classifier head with fewer classes) gets ``r = min(in, out)``,
        a full-rank adapter, and one `UserWarning` lists every such path; a `rank_pattern` entry
        that does not fit is an error.
      alpha: LoRA alpha; ``scale = alpha / r`` (``alpha / sqrt(r)`` with `rslora`), with the r
        the kernel actually gets (as PEFT computes it from its r), so capped too. Defaults to that
        r: scale 1.
      targets: regex (``re.search`` on the '/'-joined key path), list of regexes, or predicate
        ``(path, leaf) -> bool``. Default: every float leaf of ndim ≥ 2 whose path does not look like
        an embedding table (embed/embedding/wte/wpe), whose name is not a bias, scale or norm
        (DenseGeneral biases are 2-D), and that is not the output head onto the vocabulary
        (`output_heads`: an ``lm_head``, or a (d, V) kernel matching an embedding table (V, d));
        name a head in `targets` to adapt it.
      exclude: same forms; removes paths from `targets`.
      rank_pattern, alpha_pattern: ``{path or regex: value}``: an exact path key, else the first
        matching regex (as PEFT).
      layout: ``{path or regex: roles}``: axis roles ("i"/"o") of the trailing kernel axes; leading
        axes beyond are stacked batch axes. An exact path key wins, then the first matching regex;
        `lora_jax.layout_of` returns such a dict. Default: `default_roles`, which refuses kernels
        of 3 or more axes (other than convs): their shape does not say which axes are which.
      init: "lora" (Kaiming-uniform `a`, zero `b`, PEFT's default), "gaussian" (a ~ N(0, 1/r²)·…,
        zero `b`), "pissa" (the top-r singular directions of `w` move into `a`, `b`; `w` keeps the
        residual) or "olora" (the first r columns of a QR factorisation, likewise).
      dropout: LoRA dropout rate on the adapter's input (applied when `wrap`'s function is called
        with ``lora_dropout_key=``).
      adapter_dtype: dtype of `a` and `b` (float32 by default, also for bf16 weights).
      quantize: None, or "nf4" (QLoRA), "q4_1" or "q8_0": each adapted `w` is stored quantized
        (`lora_jax.quantize`, after the init, so PiSSA/OLoRA quantize their residual) and
        dequantized inside the factored product. Kernels that are already `lora_jax.Quantized`
        (e.g. from a GGUF file) are adapted as they are (init "lora" or "gaussian").
      dora: DoRA (Liu et al. 2024; PEFT's ``use_dora=True``): each node also gets a trainable
        magnitude ``m`` (`w`'s batch and output axes, in `adapter_dtype`), initialised to
        ``‖w + scale·a@b‖`` over the input axes per output unit (after `quantize`, from the
        dequantized `w`; ``‖w‖`` for the zero-`b` inits), and stands for
        ``m ⊙ w_eff / ‖w_eff‖`` with the norm a constant in the backward pass, as PEFT's
        ``weight_norm.detach()`` (`lora_jax.node`). `wrap` runs it factored: the norm comes from
        rank-sized products (``aᵀw``, ``aᵀa``) and ``‖w_j‖²``, each output unit of the factored
        product is scaled by ``m / ‖w_eff‖``. With `dropout`, the scale multiplies
        ``x@w + scale·(dropout(x)@a)@b`` (PEFT scales ``dropout(x)@w`` on the DoRA part instead).
      key: PRNG key for the random inits; defaults to ``jax.random.key(0)``.

    Every init starts the adapted model at the base model: exactly for "lora"/"gaussian", to
    float rounding for "pissa"/"olora" (their residual is computed in float32 and cast to `w`'s dtype).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS} (LoRA-GA, which needs "
                         f"gradients: lora_jax.lora_ga_init)")
    return _adapt(params, rank, alpha=alpha, targets=targets, exclude=exclude, rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern, layout=layout, rslora=rslora, init=init, dropout=dropout,
                  adapter_dtype=adapter_dtype, quantize=quantize, dora=dora, key=key)


def lora_ga_init(
    params,
    grads,
    rank: int = 8,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    variant: str = "peft",
    alpha: float | None = None,
    targets: Selector = None,
    exclude: Selector = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layout: dict[str, str] | None = None,
    rslora: bool = False,
    dropout: float = 0.0,
    adapter_dtype=jnp.float32,
    quantize: str | None = None,
    dora: bool = False,
    key: jax.Array | None = None,
):
    """`apply` with LoRA-GA's init (Wang et al. 2024, arXiv 2407.05000), as Hugging Face PEFT
    implements it (``init_lora_weights="lora_ga"``, `LoraGAConfig`, ``LoraLayer.lora_ga_init``).

    A function of its own rather than ``apply(..., init="lora-ga", grads=...)``: the gradients are
    a required input here (PEFT's `preprocess_loraga` step), and `direction`, `scale` and
    `stable_gamma` mean nothing to the other inits, so `apply` keeps only arguments every init
    uses. Every `apply` argument works the same here (targets, exclude, rank_pattern,
    alpha_pattern, layout, rslora, dropout, adapter_dtype, quantize, dora, key, sharded kernels, leading
    batch axes), since both run the same code but for the factors' init.

    Args:
      params: the parameter tree, as for `apply`.
      grads: the loss gradient with respect to `params`, found by path: a tree with the same paths
        (``jax.grad(loss)(params, batch)``, averaged over a few batches: PEFT's
        `preprocess_loraga` divides the accumulated ``weight.grad`` by the number of backward
        passes); leaves for untargeted parameters are ignored. A targeted kernel without a float
        gradient of its own shape is a ValueError naming each one.
      rank: r. LoRA-GA takes 2r singular vectors, so the global rank is capped at
        ``min(in, out) // 2`` (one UserWarning lists the capped kernels, as `apply` does at
        min(in, out)); a `rank_pattern` entry above that, or a kernel with ``min(in, out) < 2``,
        is a ValueError (PEFT fails there on a shape mismatch).
      direction: "ArB2r" (default), "A2rBr", "ArBr" or "random", PEFT's `LoraGAConfig.direction`.
      scale: "stable" (default), "weight_svd", "gd_scale" or "unit": PEFT's `LoraGAConfig.scale`
        (how the factors are scaled; not the LoRA scale ``s = alpha / r``).
      stable_gamma: γ of the "stable" scale (PEFT's default 16).
      variant: "peft" (default: PEFT's formulas, below) or "paper" (the paper's and its authors'
        code's, see the end); `scale` takes that variant's names.
      key: PRNG key of the "random" direction (one per kernel, as `apply`'s).

    The math, in this library's orientation (kernel K (I, O) = Wᵀ, gradient G = ∂L/∂K = G_Wᵀ; per
    element of the leading batch axes, e.g. each layer of a scan-stacked kernel, its own SVD).
    With ``G = P diag(σ) Qᵀ`` (σ descending; PEFT's ``G_W = U diag(S) Vh`` is the same with
    U = Q, Vh = Pᵀ), a takes left and b right singular vectors, b with their singular values:

        a = P[:, i_a]      b = diag(σ[i_b]) Q[:, i_b]ᵀ
        (PEFT: A = Vh[i_a] = aᵀ, B = U[:, i_b] diag(σ[i_b]) = bᵀ)

    with 0-based index sets i_a, i_b: "ArB2r": 0..r-1, r..2r-1; "A2rBr": r..2r-1, 0..r-1;
    "ArBr": 1, 3, …, 2r-1 and 0, 2, …, 2r-2; "random": i_a = i_b = the first r of a random
    permutation of 0..2r-1. Then, with σ_B = σ[i_b] and O the product of the output axes:

        "stable":     b ← b · O^(1/4) / √γ
        "weight_svd": b ← b · σ₁(K) / σ_B[0]   (unchanged where σ_B[0] = 0)
        "gd_scale":   a ← a / s,  b ← b / s
        "unit":       unchanged

    and the base weight is offset so that the adapted model starts at the base model:
    ``w ← w − s·a@b`` in float32, from a and b as stored (cast to `adapter_dtype`), then cast to
    `w`'s dtype (exact up to that rounding, as for "pissa"); `quantize` quantizes that residual.

    Where this differs from PEFT:
      * the SVD is exact (``jnp.linalg.svd``), where PEFT uses ``torch.svd_lowrank(G_W,
        q=min(4r, min(shape)), niter=4)``, a randomized approximation of it (also for σ₁(W) in
        "weight_svd"). The sign of each singular pair is the solver's; since a and b take vectors
        of different indices (except "random"), a@b depends on it, in PEFT too.
      * O is the kernel's output size; PEFT's ``weight.shape[0]``, which is the input size for a
        ``fan_in_fan_out`` (GPT-2 Conv1D) layer.
      * a and b are stored in `adapter_dtype` (float32), PEFT's in the base weight's dtype.
      * "random" draws from `key` (per kernel, per batch element), PEFT from torch's global RNG.
      * PEFT falls back to the default LoRA init where a layer has no gradient; this raises.
      * PEFT's LoRA-GA takes nn.Linear and Conv1D layers only; here any kernel with roles (a
        DenseGeneral, a conv) works on its matrix form (I, O).
    PEFT differs from the paper (Wang et al., section 3) and its authors' code (Outsider565/LoRA-GA,
    ``LoraLayer.lora_ga_init``); ``variant="paper"`` follows them instead: b holds no singular
    values, ``a = P[:, i_a]``, ``b = Q[:, i_b]ᵀ`` (the paper's A₀ = V[:, :r]ᵀ… in its own
    orientation: orthonormal factors), "random" takes disjoint halves of one permutation of
    0..2r-1 for i_a and i_b, and the scales are "stable" (both factors times O^(1/4)/√γ — the
    paper's stable scale), "gd" (both over s), "weightS" (both times the mean of √(σ_i(K)/s) over
    the top r singular values of the kernel) or "unit". The default stays PEFT's (``"peft"``),
    the implementation most users compare against; both are tested against float64 oracles.
    """
    if variant not in ("peft", "paper"):
        raise ValueError(f"unknown LoRA-GA variant {variant!r}; choose 'peft' or 'paper'")
    if direction not in LORA_GA_DIRECTIONS:
        raise ValueError(f"unknown LoRA-GA direction {direction!r}; choose one of {LORA_GA_DIRECTIONS}")
    scales = LORA_GA_SCALES if variant == "peft" else LORA_GA_PAPER_SCALES
    if scale not in scales:
        raise ValueError(f"unknown LoRA-GA scale {scale!r} for variant {variant!r}; choose one of {scales}")
    if scale == "stable" and not stable_gamma > 0:
        raise ValueError(f"stable_gamma must be > 0, got {stable_gamma!r}")
    return _adapt(params, rank, alpha=alpha, targets=targets, exclude=exclude, rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern, layout=layout, rslora=rslora, init="lora-ga",
                  dropout=dropout, adapter_dtype=adapter_dtype, quantize=quantize, dora=dora, key=key,
                  grads=grads, lora_ga=_LoraGA(direction, scale, float(stable_gamma), variant))


@dataclasses.dataclass(frozen=True)
class _LoraGA:
    """LoRA-GA's options (static: they pick code paths), the gradients travel separately."""

    direction: str
    scale: str
    stable_gamma: float
    variant: str = "peft"


def _adapt(params, rank, *, alpha, targets, exclude, rank_pattern, alpha_pattern, layout, rslora,
           init, dropout, adapter_dtype, quantize, dora, key, grads=None, lora_ga=None):
    """`apply` and `lora_ga_init`: select, check, init each targeted kernel."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    key = jax.random.key(0) if key is None else key
    leaves, treedef, chosen, roles_of = _select(params, targets, exclude, layout)
    grad_of = {} if lora_ga is None else _gradients_for(grads, leaves, chosen)
    per_rank = 1 if lora_ga is None else 2

    out = [leaf for _, leaf in leaves]
    capped = []
    for i in chosen:
        path, w = leaves[i]
        roles = _check_roles(roles_of[i], w.shape, path)
        r = _rank(path, w.shape, roles, rank, rank_pattern, per_rank)
        if r < rank and lookup_pattern(rank_pattern, path, None) is None:
            capped.append(f"{path} {tuple(w.shape)} -> r={r}")
        a_alpha = lookup_pattern(alpha_pattern, path, r if alpha is None else alpha)
        scale = float(a_alpha) / (math.sqrt(r) if rslora else r)
        if is_quantized(w) and init not in ("lora", "gaussian"):
            raise ValueError(f"init {init!r} needs a float kernel, but {path!r} is quantized: "
                             "quantize after it (apply(..., quantize=...)) or use init 'lora'")
        node = _init_node(w, roles, int(r), scale, init, dropout, adapter_dtype,
                          jax.random.fold_in(key, i), grad_of.get(i), lora_ga)
        if quantize is not None and not is_quantized(node.w):
            node = dataclasses.replace(node, w=_quantize(node.w, quantize))
        if dora:  # PEFT: the norm of the (dequantized) weight plus the initial adapter
            node = dataclasses.replace(node, m=node.weight_norm().astype(adapter_dtype))
        out[i] = node
    if capped:
        what = ("min(in, out) of {n} kernel(s), which get a full-rank adapter of rank min(in, out)"
                if per_rank == 1 else "min(in, out) // 2 of {n} kernel(s) (LoRA-GA takes 2r singular "
                "vectors), which get an adapter of rank min(in, out) // 2")
        warnings.warn(f"rank {rank} exceeds {what.format(n=len(capped))} instead (scale = alpha/r "
                      f"with that r): {'; '.join(capped)}", UserWarning, stacklevel=3)
    return jax.tree.unflatten(treedef, out)


def _select(params, targets, exclude, layout):
    """Flattened `params`, the indices of the targeted leaves, and their roles (checked)."""
    if targets is not None:
        select = compile_selector(targets, "targets")
    else:
        heads = set(output_heads(params))
        select = lambda path, leaf: _default_target(path, leaf) and path not in heads
    drop = compile_selector(exclude, "exclude")

    leaves, treedef = flatten_with_paths(params, is_leaf=lambda x: is_lora(x) or is_quantized(x))
    already = [p for p, leaf in leaves if is_lora(leaf)]
    if already:
        raise ValueError(f"params already hold LoRA nodes (e.g. {already[:3]}); merge them first")

    chosen = [i for i, (p, leaf) in enumerate(leaves) if select(p, leaf) and not drop(p, leaf)]
    if not chosen:
        shown = [f"{p} {tuple(np.shape(leaf))}" for p, leaf in leaves if _is_float_array(leaf)][:12]
        raise ValueError(f"targets {targets!r} matched no parameter (after exclude={exclude!r}). "
                         f"Some available paths: {shown}")
    bad = [f"{leaves[i][0]} {getattr(leaves[i][1], 'dtype', type(leaves[i][1]).__name__)}"
           f"{tuple(np.shape(leaves[i][1]))}" for i in chosen
           if not (_is_float_array(leaves[i][1]) and np.ndim(leaves[i][1]) >= 2)]
    if bad:
        raise ValueError(f"targets {targets!r} select leaves that cannot be adapted (LoRA needs a "
                         f"float array of ndim >= 2): {bad}; narrow targets or add exclude")

    roles_of = {i: _roles(leaves[i][0], leaves[i][1].shape, layout) for i in chosen}
    ambiguous = [f"{leaves[i][0]!r} {tuple(leaves[i][1].shape)}" for i, r in roles_of.items() if r is None]
    if ambiguous:
        raise ValueError(_ambiguous_message(ambiguous))
    return leaves, treedef, chosen, roles_of


def _gradients_for(grads, leaves, chosen):
    """{leaf index: gradient} for the targeted kernels, found in `grads` by path; one ValueError
    naming every targeted kernel whose gradient is missing or has the wrong shape."""
    found = dict(flatten_with_paths(grads, is_leaf=lambda x: is_lora(x) or is_quantized(x))[0])
    missing, wrong, out = [], [], {}
    for i in chosen:
        path, w = leaves[i]
        g = found.get(path)
        if not _is_float_array(g):
            missing.append(path if g is None else f"{path} ({type(g).__name__})")
        elif tuple(g.shape) != tuple(w.shape):
            wrong.append(f"{path}: gradient {tuple(g.shape)}, kernel {tuple(w.shape)}")
        else:
            out[i] = g
    if missing:
        raise ValueError(f"grads holds no float gradient for {len(missing)} targeted kernel(s): "
                         f"{missing}. Pass the gradient of the loss with respect to params (same "
                         f"paths, e.g. jax.grad(loss)(params, batch)), or narrow targets/exclude")
    if wrong:
        raise ValueError(f"grads has gradients of the wrong shape (each must have its kernel's "
                         f"shape): {'; '.join(wrong)}")
    return out


def _as_matrix(x, roles):
    """(…batch, axes in w order) → (batch, I, O) with in axes first, and the inverse map."""
    nb = x.ndim - len(roles)
    ins = [nb + k for k, role in enumerate(roles) if role == "i"]
    outs = [nb + k for k, role in enumerate(roles) if role == "o"]
    perm = list(range(nb)) + ins + outs
    batch = x.shape[:nb]
    I = math.prod(x.shape[d] for d in ins)
    O = math.prod(x.shape[d] for d in outs)
    return jnp.transpose(x, perm).reshape((math.prod(batch), I, O))


def _init_node(w, roles, r, scale, init, dropout, dtype, key, grad=None, lora_ga=None):
    placed = None if is_quantized(w) else factor_shardings(array_sharding(w), w.ndim, roles)
    init_fn = lambda w, key, grad: _init_factors(w, roles, r, scale, init, dropout, dtype, key,
                                                 grad, lora_ga)
    if placed is None:
        return init_fn(w, key, grad)
    # w is sharded (FSDP, tensor parallel): create the factors directly in their shardings (also
    # across processes: every process runs the same jitted init), so no device ever holds a whole one
    w_sharding = array_sharding(w)
    make = jax.jit(init_fn, out_shardings=LoRA(w=w_sharding, a=placed[0], b=placed[1], scale=scale,
                                               roles=roles, dropout=dropout))
    return make(w, key, grad)


def _init_factors(w, roles, r, scale, init, dropout, dtype, key, grad=None, lora_ga=None):
    a_shape, b_shape = factor_shapes(w.shape, roles, r)
    fan_in, _ = fan_in_out(w.shape, roles)
    if init in ("lora", "gaussian"):
        if init == "lora":  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, in) → U(±1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        else:  # PEFT's "gaussian": normal with std 1/r
            a = jax.random.normal(key, a_shape, dtype) / r
        return LoRA(w=w, a=a, b=jnp.zeros(b_shape, dtype), scale=scale, roles=roles, dropout=dropout)

    m = _as_matrix(w.astype(jnp.float32), roles)  # (batch, I, O)
    if init == "lora-ga":
        g = _as_matrix(grad.astype(jnp.float32), roles)
        a_m, b_m = _lora_ga_matrices(g, m, r, scale, lora_ga, key)
    elif init == "pissa":
        u, s, vt = jnp.linalg.svd(m, full_matrices=False)
        root = jnp.sqrt(s[:, :r] / scale)
        a_m = u[:, :, :r] * root[:, None, :]
        b_m = root[:, :, None] * vt[:, :r, :]
    else:  # olora: W = Kᵀ = Q R (PEFT's orientation); B = Q_r, A = R_r → a = R_rᵀ, b = Q_rᵀ
        q, rr = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))
        a_m = jnp.swapaxes(rr[:, :r, :], -1, -2)
        b_m = jnp.swapaxes(q[:, :, :r], -1, -2)
    a = a_m.reshape(a_shape).astype(dtype)
    b = b_m.reshape(b_shape).astype(dtype)
    node = LoRA(w=w, a=a, b=b, scale=scale, roles=roles, dropout=dropout)
    residual = w.astype(jnp.float32) - node.delta(jnp.float32)
    return dataclasses.replace(node, w=residual.astype(w.dtype))


def _lora_ga_matrices(g, m, r, lora_scale, opts: _LoraGA, key):
    """LoRA-GA's matrix-form factors from the kernel gradients g and kernels m, both (n, I, O):
    a (n, I, r), b (n, r, O), one SVD per batch element (see `lora_ga_init` for the math)."""
    p, s, qt = jnp.linalg.svd(g, full_matrices=False)  # g = P diag(s) Qᵀ; PEFT's U = Q, Vh = Pᵀ
    n = g.shape[0]
    if opts.direction == "random" and opts.variant == "paper":  # the authors: disjoint halves of a permutation
        perm = jax.vmap(lambda k: jax.random.permutation(k, 2 * r))(jax.random.split(key, n))
        ia, ib = perm[:, :r], perm[:, r:]
    elif opts.direction == "random":  # PEFT: indices = randperm(2r)[:r], the same for A and B
        idx = jax.vmap(lambda k: jax.random.permutation(k, 2 * r)[:r])(jax.random.split(key, n))
        ia = ib = idx
    else:
        ia, ib = {"ArB2r": (np.arange(r), np.arange(r, 2 * r)),
                  "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
                  "ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2))}[opts.direction]
        ia, ib = (jnp.broadcast_to(jnp.asarray(x), (n, r)) for x in (ia, ib))
    a = jnp.take_along_axis(p, ia[:, None, :], axis=2)  # A = Vh[ia] → a = P[:, ia]
    if opts.variant == "paper":
        return _paper_scaled(a, jnp.take_along_axis(qt, ib[:, :, None], axis=1), g, m, r, lora_scale, opts)
    s_b = jnp.take_along_axis(s, ib, axis=1)  # (n, r)
    b = s_b[:, :, None] * jnp.take_along_axis(qt, ib[:, :, None], axis=1)  # B = U[:, ib] diag(s_b)
    if opts.scale == "stable":  # PEFT: out_features ** 0.25 / stable_gamma ** 0.5, on B only
        b = b * (g.shape[2] ** 0.25 / opts.stable_gamma ** 0.5)
    elif opts.scale == "weight_svd":  # PEFT: σ₁(W) / s_b[0] on B, where s_b[0] > 0
        top = jnp.linalg.svd(m, compute_uv=False)[:, 0]
        first = s_b[:, 0]
        factor = jnp.where(first > 0, top / jnp.where(first > 0, first, 1.0), 1.0)
        b = b * factor[:, None, None]
    elif opts.scale == "gd_scale":  # PEFT: A / scaling, B / scaling
        a, b = a / lora_scale, b / lora_scale
    return a, b


def _paper_scaled(a, b, g, m, r, lora_scale, opts: _LoraGA):
    """The paper's (and its authors' code's) scales of a = P[:, i_a], b = Q[:, i_b]ᵀ (orthonormal,
    no singular values): "stable" both times O^(1/4)/√γ, "gd" both over s, "weightS" both times
    the mean of √(σ_i(K)/s) over the top r, "unit" neither."""
    if opts.scale == "stable":
        c = g.shape[2] ** 0.25 / opts.stable_gamma ** 0.5
        return a * c, b * c
    if opts.scale == "gd":
        return a / lora_scale, b / lora_scale
    if opts.scale == "weightS":
        c = jnp.mean(jnp.sqrt(jnp.linalg.svd(m, compute_uv=False)[:, :r] / lora_scale), axis=1)
        return a * c[:, None, None], b * c[:, None, None]
    return a, b
