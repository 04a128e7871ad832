"""Where a trainer's arrays live and how its step runs on many devices and processes.

Layouts (``--mesh`` / ``--pmap``, `from_args`):

* one device (default): arrays on the default device, ``jax.jit`` steps;
* ``--mesh data=4,fsdp=2`` (axis sizes multiply to ``jax.device_count()``, any one may be -1): a
  ``jax.sharding.Mesh`` with two axes, steps under ``jax.jit`` with ``NamedSharding`` inputs and
  XLA's sharding propagation (GSPMD). Batches are split over both axes (every device gets
  ``batch / device_count`` rows). Frozen weights and every other parameter of two or more axes are
  split over ``fsdp`` along their largest axis that it divides (leading stacked-layer axes excluded),
  so each device holds ``1/fsdp`` of them; 1-D leaves (biases, norms) are replicated. LoRA factors
  follow their weight axis by axis (`lora_jax.sharding`: ``a`` split like ``w``'s input axes, ``b``
  like its output axes, the rank axis whole), and so do optimizer moments (`lora_pro_adamw`'s
  full-shape moments are split exactly like ``w``). ``data=N`` alone is plain data parallelism
  (everything replicated), ``fsdp=N`` alone is ZeRO-3-style full sharding. This is the recommended
  form: one program, any mesh, many processes.
* ``--pmap``: ``jax.pmap`` over the local devices with the axis name
  ``"batch"``; the trainable half, optimizer state and frozen weights are replicated per device, each
  device takes ``batch / local_device_count`` rows, and the gradients are averaged with
  ``lax.pmean`` before the optimizer. Data parallel only, and one process only (jit + a mesh does
  both and more). Dropout keys are folded with the device index, so masks differ from a one-device
  run's (train with ``--dropout 0 --lora-dropout 0`` to compare).

Processes (``--distributed``, `train.hosts.init_distributed`): ``jax.distributed.initialize`` with
``--coordinator host:port --num-processes N --process-id i`` (or, without them, JAX's own
detection on Cloud TPU pods, SLURM, Open MPI, ...). Every process runs the same program on the
same data (batches are a pure function of seed and step, `train.loop.BatchOrder`) and
contributes its devices' rows (`Parallel.batch`); checkpoints are written by all processes
together through orbax and restore on any mesh; only process 0 writes metrics, plots and summary.
A process that dies makes the others stop within ``--heartbeat-timeout`` seconds (JAX's
coordination service).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lora_jax._compat import YNN_OFF, cpu_unit_rows_unsafe
from lora_jax.paths import flatten_with_paths
from .errors import ConfigError

BATCH_AXIS = "batch"  # pmap's axis name


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices and processes (train.parallel)")
    g.add_argument("--mesh", default=None, metavar="data=D,fsdp=F",
                   help="run on a device mesh under jax.jit: batch split over all devices, weights of "
                        "2+ axes split over 'fsdp' (e.g. data=4,fsdp=2; data=8 is plain data parallel; "
                        "one size may be -1). Default: one device")
    g.add_argument("--pmap", action="store_true",
                   help="data parallel with jax.pmap and lax.pmean over the local devices "
                        "(the recommended form is --mesh)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize first (with --coordinator/--num-processes/"
                        "--process-id, or auto-detected on TPU pods, SLURM, ...)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service (implies --distributed)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent (dead) process makes the others stop")


def parse_mesh(spec: str, device_count: int) -> dict[str, int]:
    """``"data=4,fsdp=2"`` → ``{"data": 4, "fsdp": 2}`` (missing axes are 1; one size may be -1)."""
    sizes = {"data": 1, "fsdp": 1}
    seen = set()
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in sizes or name in seen:
            raise ConfigError(f"--mesh {spec!r}: expected comma-separated data=N and/or fsdp=N")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {spec!r}: {name} size {value!r} is not an integer") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ConfigError(f"--mesh {spec!r}: sizes must be >= 1 (or -1 for 'the rest')")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"--mesh {spec!r}: at most one size may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if device_count % fixed:
            raise ConfigError(f"--mesh {spec!r}: {device_count} devices are not a multiple of {fixed}")
        sizes[free[0]] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise ConfigError(f"--mesh {spec!r}: {math.prod(sizes.values())} devices in the mesh, but "
                          f"{device_count} are present (jax.device_count())")
    return sizes


@dataclasses.dataclass
class Parallel:
    """A layout: ``kind`` is ``"single"``, ``"mesh"`` or ``"pmap"``; `mesh` for ``"mesh"``."""

    kind: str
    mesh: Any = None

    # ------------------------------------------------------------------ describing

    @property
    def fsdp(self) -> int:
        return self.mesh.shape["fsdp"] if self.kind == "mesh" else 1

    @property
    def batch_divisor(self) -> int:
        return {"single": 1, "mesh": jax.device_count(), "pmap": jax.local_device_count()}[self.kind]

    def describe(self) -> str:
        if self.kind == "mesh":
            return (f"mesh {dict(self.mesh.shape)} over {jax.device_count()} devices in "
                    f"{jax.process_count()} process(es)")
        if self.kind == "pmap":
            return f"pmap over {jax.local_device_count()} devices"
        return f"one device ({jax.devices()[0]})"

    def check_batch(self, batch_size: int, flag: str = "--batch-size", factored: bool = True) -> None:
        """`batch_size` must split evenly over the devices; with `factored` (a step that runs LoRA's
        factored product), not one row per CPU device (an XLA:CPU miscompile: `lora_jax._compat`)."""
        d = self.batch_divisor
        if batch_size % d:
            raise ConfigError(f"{flag} {batch_size} must be a multiple of the {d} devices the batch is "
                              f"split over ({self.describe()})")
        if factored and self.kind == "mesh" and cpu_unit_rows_unsafe(jax.default_backend(), batch_size // d):
            raise ConfigError(f"{flag} {batch_size} gives each of the {d} CPU devices one row, which XLA:CPU "
                              f"miscompiles (its YNNPACK fusion); use at least 2 rows per device, or set "
                              f"XLA_FLAGS={YNN_OFF} before starting")

    # ------------------------------------------------------------------ placing arrays

    def param_spec(self, shape, batch_axes: int = 0):
        """FSDP spec of a parameter: its largest non-batch axis that ``fsdp`` divides, for ndim ≥ 2."""
        f = self.fsdp
        if f == 1 or len(shape) < 2:
            return P()
        axes = [d for d in range(batch_axes, len(shape)) if shape[d] % f == 0]
        if not axes:
            return None
        best = max(axes, key=lambda d: (shape[d], -d))
        return P(*(("fsdp" if d == best else None) for d in range(len(shape))))

    def place_params(self, params, layout: dict[str, str] | None = None):
        """`params` (host or one-device arrays, the same in every process) placed for this layout:
        FSDP-split or replicated over the mesh (`param_spec`); unchanged for one device or pmap.
        `layout` (``{path: roles}``, as `lora_jax.layout_of` returns) tells stacked leading axes,
        which are never split."""
        if self.kind != "mesh":
            return params


        leaves, treedef = flatten_with_paths(params)
        out, whole = [], []
        for path, x in leaves:
            nb = max(0, np.ndim(x) - len(layout[path])) if layout and path in layout else 0
            spec = self.param_spec(np.shape(x), nb)
            if spec is None:
                whole.append(f"{path} {tuple(np.shape(x))}")
                spec = P()
            out.append(put_global(x, NamedSharding(self.mesh, spec)))
        if whole:
            warnings.warn(f"fsdp={self.fsdp} divides no axis of {len(whole)} parameter(s), which stay "
                          f"replicated: {'; '.join(whole[:8])}", UserWarning, stacklevel=2)
        return jax.tree.unflatten(treedef, out)

    def batch(self, arrays: dict) -> dict:
        """A global batch (the same NumPy rows in every process) as device arrays: rows split over
        every mesh axis; for pmap, reshaped to (local devices, rows per device, ...)."""
        if self.kind == "single":
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        if self.kind == "pmap":
            n = jax.local_device_count()
            return {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in arrays.items()}
        rows = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        return {k: put_global(v, rows) for k, v in arrays.items()}

    def eval_batch(self, arrays: dict) -> dict:
        """An evaluation batch: rows split as `batch` when the devices divide them, else replicated
        on the mesh (the last, padded batch may not divide); one device for pmap (evaluation runs
        on device 0's copy)."""
        if self.kind != "mesh":
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        n = len(next(iter(arrays.values())))
        if n % jax.device_count() == 0:
            return self.batch(arrays)
        return {k: put_global(v, NamedSharding(self.mesh, P())) for k, v in arrays.items()}

    def on_devices(self, tree):
        """On a mesh: every leaf not already placed on it (an optimizer's step count, say) replicated
        over it, so a jitted step sees global arrays only (required with several processes)."""
        if self.kind != "mesh":
            return tree

        def place(x):
            s = getattr(x, "sharding", None)
            if isinstance(s, NamedSharding) and s.mesh == self.mesh:
                return x
            return put_global(x, NamedSharding(self.mesh, P()))
        return jax.tree.map(place, tree)

    def for_step(self, tree):
        """`tree` in the form the step takes: for pmap a copy per local device (leading axis);
        unchanged otherwise."""
        if self.kind == "pmap":
            # copied by a pmap itself, so the copies carry the sharding the step's outputs will have
            # (a device_put to a NamedSharding would make the second step compile again)
            n = jax.local_device_count()
            copy = jax.pmap(lambda _, t: t, in_axes=(0, None), axis_name=BATCH_AXIS)
            return copy(np.zeros(n, np.int8), tree)
        return tree

    def unreplicated(self, tree):
        """The inverse of `for_step` (device 0's copy for pmap); the identity otherwise."""
        if self.kind == "pmap":
            return jax.tree.map(lambda x: x[0], tree)
        return tree

    def key(self) -> tuple:
        """Hashable: runs with equal keys can share compiled steps."""
        return (self.kind, tuple(self.mesh.shape.items()) if self.mesh is not None else ())

    # ------------------------------------------------------------------ steps

    def train_step(self, loss_fn: Callable, optimizer) -> Callable:
        """``step(tr, opt_state, frozen, batch, key) -> (tr, opt_state, loss)``, compiled for this
        layout; `loss_fn(tr, frozen, batch, key)` is the mean loss of the rows it is given."""

        def one_step(tr, opt_state, fr, batch, key):
            loss, grads = jax.value_and_grad(loss_fn)(tr, fr, batch, key)
            updates, opt_state = optimizer.update(grads, opt_state, tr)
            return optax.apply_updates(tr, updates), opt_state, loss

        if self.kind == "single":
            return jax.jit(one_step, donate_argnums=(0, 1))
        if self.kind == "mesh":
            return _PinnedStep(one_step, self.mesh)

        def device_step(tr, opt_state, fr, batch, key):
            key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXIS))  # own dropout mask per device
            loss, grads = jax.value_and_grad(loss_fn)(tr, fr, batch, key)
            # every device holds as many rows, so the mean of the per-device means is the batch mean
            loss, grads = jax.lax.pmean((loss, grads), BATCH_AXIS)
            updates, opt_state = optimizer.update(grads, opt_state, tr)
            return optax.apply_updates(tr, updates), opt_state, loss

        stepped = jax.pmap(device_step, axis_name=BATCH_AXIS, in_axes=(0, 0, 0, 0, None),
                           donate_argnums=(0, 1))

        def step(tr, opt_state, fr, batch, key):
            tr, opt_state, loss = stepped(tr, opt_state, fr, batch, key)
            return tr, opt_state, loss[0]
        return step


class _PinnedStep:
    """A mesh step whose new trainable half and optimizer state keep the shardings they came in
    with (left to itself, sharding propagation may hand back e.g. replicated adapters split, so the
    next step would compile again for another layout); one compiled step per input layout."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh, self.jitted = fn, mesh, {}

    def _for(self, tr, opt_state):
        leaves, treedef = jax.tree.flatten((tr, opt_state))
        key = (treedef, tuple(x.sharding for x in leaves))
        if key not in self.jitted:
            state_out = jax.tree.unflatten(treedef, list(key[1]))
            self.jitted[key] = jax.jit(self.fn, donate_argnums=(0, 1),
                                       out_shardings=(*state_out, NamedSharding(self.mesh, P())))
        return self.jitted[key]

    def __call__(self, tr, opt_state, fr, batch, key):
        return self._for(tr, opt_state)(tr, opt_state, fr, batch, key)

    def lower(self, tr, opt_state, fr, batch, key):
        return self._for(tr, opt_state).lower(tr, opt_state, fr, batch, key)


def put_global(x, sharding):
    """`x` (a host array, or a one-device array holding the same value in every process) as a
    global array with `sharding`: each process fills only its own devices' shards."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else None
    if host is None:  # already global: reshard on the devices
        return jax.jit(lambda y: y, out_shardings=sharding)(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def from_args(args) -> Parallel:
    """The layout the flags ask for (after `train.hosts.init_distributed`)."""
    if args.pmap and args.mesh:
        raise ConfigError("--pmap and --mesh are two layouts: give one")
    if args.pmap:
        if jax.process_count() > 1:
            raise ConfigError("--pmap runs in one process; across processes use --mesh (jax.jit)")
        return Parallel("pmap")
    if args.mesh:
        sizes = parse_mesh(args.mesh, jax.device_count())

        # Auto axes: XLA's sharding propagation decides the layout of intermediates (GSPMD)
        mesh = jax.make_mesh((sizes["data"], sizes["fsdp"]), ("data", "fsdp"),
                             axis_types=(AxisType.Auto, AxisType.Auto))
        return Parallel("mesh", mesh)
    if jax.process_count() > 1:
        raise ConfigError("several processes need a --mesh spanning their devices")
    return Parallel("single")
