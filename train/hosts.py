"""Process-wide helpers of a trainer: which process writes, barriers, gathering arrays split across
processes, ``jax.distributed`` start-up and the persistent compilation cache.

With one process these are trivial (process 0 is the only one, barriers are no-ops)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from .assets import cache_dir
from .errors import ConfigError

COMPILE_CACHE_ENV = "LORA_JAX_COMPILE_CACHE"


def is_primary() -> bool:
    """Whether this is process 0, the one that writes metrics, plots and summaries."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier over all processes (no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
    """A NumPy copy of the whole of `x`, also of an array split across processes (gathered)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` if the flags ask for it; must run before any JAX computation."""
    wanted = args.distributed or args.coordinator is not None
    if not wanted:
        if args.num_processes is not None or args.process_id is not None:
            raise ConfigError("--num-processes/--process-id need --coordinator (or --distributed)")
        return
    kw = {}
    if args.coordinator is not None:
        if args.num_processes is None or args.process_id is None:
            raise ConfigError("--coordinator needs --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            raise ConfigError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
        kw = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                  process_id=args.process_id)
    if args.heartbeat_timeout < 1:
        raise ConfigError(f"--heartbeat-timeout must be >= 1, got {args.heartbeat_timeout}")
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**kw, heartbeat_timeout_seconds=args.heartbeat_timeout)


def compile_cache_dir(flag: str | None) -> Path | None:
    """Where compiled steps are kept: `flag` (``--compile-cache``; ``off`` for nowhere), else
    ``$LORA_JAX_COMPILE_CACHE``, else ``<lora_jax cache>/jax_compilation``."""
    value = flag if flag is not None else os.environ.get(COMPILE_CACHE_ENV)
    if value is not None:
        return None if value in ("", "off") else Path(value).expanduser()
    return cache_dir() / "jax_compilation"


def use_compile_cache(path: Path | None) -> None:
    """JAX's persistent compilation cache in `path` (None: leave JAX's setting alone).

    Runs of one process (a benchmark's seeds, a test's runs) and later processes then load a step
    XLA compiled before instead of compiling it again. Every executable is kept, also the small and
    fast-compiling ones of XLA:CPU (JAX's defaults keep only those that took a second or more). The
    first directory a process uses stays its cache (JAX initialises the cache once)."""
    if path is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
