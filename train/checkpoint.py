"""Orbax checkpoints for the trainers (`train.loop` opens and writes them), verified on restore.

One checkpoint = one orbax step directory ``<dir>/<step>/`` with two items:

* ``state``: the arrays to resume from, as a flat dict ``{"00000": leaf, ...}`` in the leaf order
  of the (trainable, optimizer state) tree. For LoRA methods the trainable tree is only the
  adapters' ``a``/``b`` (and a classifier's head; see `lora_jax.split`); the frozen model is re-read
  from its files on resume and never written.
* ``meta``: JSON: step, run config, data/rng state and a checksum (sha256 over every leaf's dtype,
  shape and bytes; plus a crc32 per leaf to name a damaged one).

Saving goes through ``ocp.CheckpointManager`` (``save_interval_steps``, ``max_to_keep``),
synchronously. Orbax writes a step into a temporary directory and renames it into place only when
complete (atomic finalize), so a process killed mid-save leaves no finalized checkpoint for that
step; `Checkpointer.steps` lists finalized ones only, and leftovers are cleaned up on open.

`Checkpointer.restore` never returns damaged data: if orbax cannot read a checkpoint (truncated
or deleted files) or the arrays it returns do not match the stored checksum (overwritten bytes),
it raises `CheckpointError` naming the step directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .errors import CheckpointError
from .hosts import is_primary, sync, to_host

__all__ = ["CheckpointError", "Checkpointer", "tree_checksum", "dir_bytes"]


def _leaf_bytes(x) -> tuple[np.ndarray, bytes]:
    a = np.ascontiguousarray(np.asarray(x))
    return a, a.tobytes()


def tree_checksum(leaves) -> tuple[str, list[int]]:
    """(sha256 hex over all leaves, crc32 per leaf); dtype and shape are part of the digest."""
    h = hashlib.sha256()
    crcs = []
    for x in leaves:
        a, b = _leaf_bytes(x)
        head = f"{a.dtype.str}{a.shape};".encode()
        h.update(head)
        h.update(b)
        crcs.append(zlib.crc32(head + b))
    return h.hexdigest(), crcs


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under `path`."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _key(i: int) -> str:
    return f"{i:05d}"


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return np.zeros(x.shape, x.dtype)


def _placed_like(x, want):
    """Restored `x` placed as `want` is. orbax commits what it restores to a device; where `want` is
    not committed (a fresh array on the default device), neither is the result, so that a jitted step
    sees the same arguments as in a fresh run and does not compile again for a resumed one."""
    if not isinstance(x, jax.Array) or (isinstance(want, jax.Array) and not want.committed):
        return jnp.asarray(to_host(x))
    return x


class Checkpointer:
    """Save/restore (trainable, optimizer state) trees with orbax, checksummed.

    ``every``: save interval in steps (orbax ``save_interval_steps``); ``keep``: ``max_to_keep``.
    """

    def __init__(self, directory: str | os.PathLike, every: int, keep: int = 2):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {every}")
        self.directory = Path(directory).absolute()
        self.every = every
        # orbax logs every save at INFO/WARNING level through absl; keep the progress bar clean
        logging.getLogger("absl").setLevel(logging.ERROR)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # remove what a killed save left behind
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ queries

    def steps(self) -> list[int]:
        """Finalized checkpoint steps, ascending (an interrupted save is not among them)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def size_bytes(self, step: int) -> int:
        return dir_bytes(self.step_dir(step))

    # ------------------------------------------------------------------ save

    def save(self, step: int, tree: Any, meta: dict, *, force: bool = False) -> bool:
        """Save `tree` (any pytree of arrays) and `meta` at `step` if the interval says so
        (or `force`). Returns whether a checkpoint was written (and finalized)."""
        if not force and step % self.every:
            return False  # (orbax alone would also save the first step it sees)
        leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for x in jax.tree.leaves(tree)]
        # the checksum needs every byte in every process: arrays split across processes are gathered
        # one array at a time (a host holds one whole array at most, not the whole state)
        digest, crcs = tree_checksum(to_host(x) for x in leaves)
        meta = dict(meta, step=int(step), num_leaves=len(leaves), sha256=digest, crc32=crcs,
                    shapes=[list(x.shape) for x in leaves], dtypes=[np.dtype(x.dtype).str for x in leaves])
        flat = {_key(i): x for i, x in enumerate(leaves)}  # orbax writes each shard from its process
        saved = self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        self.manager.wait_until_finished()
        if saved and is_primary():
            self._write_manifest(int(step))
        sync(f"checkpoint_manifest_{step}")
        return bool(saved)

    # ------------------------------------------------------------------ file manifests
    #
    # After orbax has finalized step k, the size and crc32 of every file in <dir>/k/ go to
    # <dir>.manifests/k.json (written atomically). A restore first compares the files with it, so
    # damage to any file is caught, also to one whose arrays would still read back. A process killed
    # between the finalize and the manifest leaves a checkpoint without one: it is then checked by
    # the array checksum alone.

    @property
    def manifest_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + ".manifests")

    def _files(self, step: int) -> dict[str, list[int]]:
        root = self.step_dir(step)
        out = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                out[str(p.relative_to(root))] = [len(data), zlib.crc32(data)]
        return out

    def _write_manifest(self, step: int) -> None:
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        path = self.manifest_dir / f"{step}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._files(step)))
        os.replace(tmp, path)
        keep = {str(s) for s in self.steps()}
        for old in self.manifest_dir.glob("*.json"):
            if old.stem not in keep:
                old.unlink(missing_ok=True)

    def _check_manifest(self, step: int, hint: str) -> None:
        path = self.manifest_dir / f"{step}.json"
        if not path.is_file():
            return
        want = json.loads(path.read_text())
        got = self._files(step)
        missing = sorted(set(want) - set(got))
        changed = sorted(f for f in want if f in got and got[f] != want[f])
        if missing or changed:
            detail = "; ".join(
                [f"missing {f}" for f in missing[:5]]
                + [f"{f}: {got[f][0]} bytes (saved: {want[f][0]}), crc32 differs" if got[f][0] == want[f][0]
                   else f"{f}: {got[f][0]} bytes, saved with {want[f][0]} (truncated?)" for f in changed[:5]])
            raise CheckpointError(f"checkpoint {self.step_dir(step)} is truncated or corrupted: its files "
                                  f"differ from those written at save time ({detail}). {hint}")

    # ------------------------------------------------------------------ restore

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """(tree shaped like `like`, meta) from `step` (default: the latest finalized one).

        Raises `CheckpointError` if the checkpoint cannot be read or fails verification.
        """
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no finalized checkpoint in {self.directory}")
            step = steps[-1]
        path = self.step_dir(step)
        earlier = [s for s in steps if s < step]
        hint = (f"Delete {path} to resume from the previous checkpoint (step {earlier[-1]}), "
                if earlier else f"Delete {path} ")
        hint += "or start the run again without --resume (with --overwrite)."
        self._check_manifest(step, hint)
        like_leaves, treedef = jax.tree.flatten(like)
        # restored straight into `like`'s shardings: a checkpoint written on one mesh (or by several
        # processes) loads onto any other
        abstract = {_key(i): _abstract(x) for i, x in enumerate(like_leaves)}
        try:
            got = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
            )
            meta = got["meta"]
            state = got["state"]
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(
                f"checkpoint {path} cannot be read: it is truncated or corrupted "
                f"({type(e).__name__}: {str(e)[:300]}). {hint}") from e
        if not isinstance(meta, dict) or "sha256" not in meta:
            raise CheckpointError(f"checkpoint {path} has no valid metadata (meta item). {hint}")
        if meta.get("num_leaves") != len(like_leaves) or not isinstance(state, dict) or len(state) != len(like_leaves):
            raise CheckpointError(
                f"checkpoint {path} holds {meta.get('num_leaves')} arrays but this run needs "
                f"{len(like_leaves)}: it was written by a different configuration. {hint}")
        arrays = [state[_key(i)] for i in range(len(like_leaves))]
        for i, (x, want) in enumerate(zip(arrays, like_leaves)):
            if tuple(x.shape) != tuple(np.shape(want)) or list(x.shape) != meta["shapes"][i]:
                raise CheckpointError(f"checkpoint {path}: array {i} has shape {x.shape}, this run "
                                      f"needs {np.shape(want)}. {hint}")
        digest, crcs = tree_checksum(to_host(x) for x in arrays)
        if digest != meta["sha256"]:
            bad = [i for i, (c, w) in enumerate(zip(crcs, meta["crc32"])) if c != w]
            raise CheckpointError(
                f"checkpoint {path} is corrupted: the restored arrays do not match the checksum "
                f"saved with them (damaged arrays: {bad[:10]}). {hint}")
        return jax.tree.unflatten(treedef, [_placed_like(x, want) for x, want in zip(arrays, like_leaves)]), meta

    def close(self) -> None:
        self.manager.close()
