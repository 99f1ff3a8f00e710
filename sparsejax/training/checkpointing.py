"""Checkpoints of a training run: orbax's CheckpointManager, plus what resuming needs.

A checkpoint holds one pytree ``state`` (params, sparsity state such as masks
and factors, optimizer state: whatever the training loop keeps; leaves are
arrays or ``None``) and a small JSON record: the step, the data position (an
int, see :mod:`sparsejax.training.data`), the run's *signature* and any extra JSON.

    ckpt = Checkpointer(workdir / "checkpoints", signature=config.to_dict(), max_to_keep=3)
    restored = ckpt.restore(state)          # None on a fresh directory
    if restored is not None:
        state, step, position = restored.state, restored.step, restored.data_position
    ...
    ckpt.save(step, state, data_position=position)
    ckpt.close()

The signature (a JSON-able dict, typically the model config) is written next to
the checkpoints when the directory is first used; a later ``Checkpointer`` with a
different signature refuses the directory with a one-line ``ValueError`` before
anything is compiled. If the newest checkpoint cannot be read (a truncated or
corrupt file), ``restore`` warns, moves it to ``<directory>/corrupt/`` and uses
the previous one.

Random keys: store ``jax.random.key_data(key)``, not a typed key array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "Restored", "check_signature", "state_fingerprint", "SIGNATURE_FILE"]

SIGNATURE_FILE = "sparsejax_signature.json"
CORRUPT_DIR = "corrupt"


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns."""

    state: Any
    step: int
    data_position: int
    extra: dict


def _normalize(signature: dict | None) -> dict | None:
    # Compare what a JSON round trip keeps: tuples and lists are the same thing on disk.
    return None if signature is None else json.loads(json.dumps(signature, sort_keys=True))


def _difference(saved: dict, current: dict, limit: int = 3) -> str:
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: {saved.get(k, '<unset>')!r} in the checkpoint, {current.get(k, '<unset>')!r} now"
             for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def check_signature(directory: str | os.PathLike, signature: dict) -> None:
    """Raises a one-line ValueError if ``directory`` holds checkpoints of another signature."""
    path = pathlib.Path(directory) / SIGNATURE_FILE
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({e}); use a new workdir or delete that file") from None
    current = _normalize(signature)
    if saved != current:
        raise ValueError(f"the checkpoints in {directory} come from a different run "
                         f"({_difference(saved, current)}); use a new workdir, or the same "
                         f"settings to resume")


@contextlib.contextmanager
def _quiet_asyncio():
    # A failed read leaves orbax's background tasks to log the same error again at length.
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_closed_loop_error(unraisable) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _ClosedLoopFilter:
    """A ``sys.unraisablehook`` that drops "Event loop is closed" and passes the rest on.

    When one array of a checkpoint cannot be read, orbax abandons the restore's event
    loop while tensorstore still completes the other reads; each completion then reports
    "RuntimeError: Event loop is closed" as an unraisable exception, hundreds of
    tracebacks for one bad chunk. The failure itself is reported once, by ``restore``.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        if not _is_closed_loop_error(unraisable):
            self.previous(unraisable)


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings for jax arrays) that tell orbax what to restore into."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.tree.map(leaf, tree)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """A position-weighted wrapping sum of the leaf's bits (uint32); integer sums are exact, so
    the value does not depend on the sharding or the reduction order."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        bits = x.astype(jnp.uint8).astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:   # 8-byte leaves split into two words
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprints(leaves: list) -> list:
    return [_leaf_fingerprint(x) for x in leaves]


def state_fingerprint(state: Any) -> list[int]:
    """One uint32 per array leaf of ``state``: restored state must reproduce it exactly."""
    leaves = [x for x in jax.tree.leaves(state)]
    return [int(v) for v in jax.device_get(_fingerprints(leaves))]


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a run in ``directory``.

    Args:
      directory: where checkpoints go (created if needed); one subdirectory per step.
      signature: a JSON-able dict identifying the run (model config, recipe...);
        a directory written with another signature is refused at construction.
      max_to_keep: how many of the newest checkpoints to keep (``None``: all).
      async_save: write in a background thread; ``wait()`` or ``close()`` blocks
        until the last save is on disk.
    """

    def __init__(self, directory: str | os.PathLike, *, signature: dict | None = None,
                 max_to_keep: int | None = 3, async_save: bool = True):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.signature = _normalize(signature)
        if self.signature is not None:
            check_signature(self.directory, self.signature)
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self._manager = self._new_manager()
        self._loop_filter: _ClosedLoopFilter | None = None
        if self.signature is not None and jax.process_index() == 0:
            self._write_signature()

    def _new_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, create=True, enable_async_checkpointing=self.async_save,
            # A save killed midway leaves a temporary directory; clear it at start-up.
            cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def _write_signature(self) -> None:
        path = self.directory / SIGNATURE_FILE
        if path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.signature, sort_keys=True, indent=1))
        os.replace(tmp, path)      # atomic: a reader sees the whole file or none

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ------------------------------------------------------------------ save / restore

    def save(self, step: int, state: Any, *, data_position: int = 0, extra: dict | None = None,
             force: bool = True) -> bool:
        """Saves ``state`` as checkpoint ``step``; returns whether a save started.

        ``extra`` is any JSON-able dict stored beside the state (e.g. metrics).
        """
        meta = {"step": int(step), "data_position": int(data_position),
                "signature": self.signature, "extra": extra or {},
                "fingerprint": state_fingerprint(state)}
        return self._manager.save(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=force)

    def _restore_step(self, step: int, abstract: Any) -> Restored:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if self.signature is not None and meta.get("signature") not in (None, self.signature):
            raise ValueError(f"checkpoint step {step} in {self.directory} comes from a different "
                             f"run ({_difference(meta['signature'], self.signature)}); use a new "
                             f"workdir, or the same settings to resume")
        if "fingerprint" in meta and state_fingerprint(out["state"]) != meta["fingerprint"]:
            raise IOError(f"checkpoint step {step}: the restored arrays differ from the saved ones "
                          f"(fingerprint mismatch)")
        return Restored(out["state"], int(meta["step"]), int(meta["data_position"]),
                        dict(meta.get("extra") or {}))

    def restore(self, template: Any, step: int | None = None) -> Restored | None:
        """Restores the newest readable checkpoint (or ``step``) into ``template``'s structure.

        ``template`` is the state pytree of a fresh run (arrays or
        ``jax.ShapeDtypeStruct``s); restored arrays take its dtypes and
        shardings. Returns ``None`` when there is no checkpoint. A newest
        checkpoint that cannot be read is moved to ``<directory>/corrupt/`` with
        a warning, and the one before it is used.
        """
        self.wait()
        abstract = _abstract(template)
        if step is not None:
            return self._restore_step(step, abstract)
        steps = sorted(self.all_steps(), reverse=True)
        unreadable, errors = [], []
        # installed for the reads; kept until close() if one failed (late completions of the
        # abandoned reads still arrive after restore returns)
        self._quiet_closed_loops()
        try:
            return self._restore_newest(steps, abstract, unreadable, errors)
        finally:
            if not errors:
                self._restore_unraisable_hook()

    def _quiet_closed_loops(self) -> None:
        if self._loop_filter is None:
            self._loop_filter = _ClosedLoopFilter(sys.unraisablehook)
            sys.unraisablehook = self._loop_filter

    def _restore_unraisable_hook(self) -> None:
        if self._loop_filter is not None:
            if sys.unraisablehook is self._loop_filter:
                sys.unraisablehook = self._loop_filter.previous
            self._loop_filter = None

    def _restore_newest(self, steps, abstract, unreadable, errors) -> Restored | None:
        for s in steps:
            try:
                with _quiet_asyncio():
                    restored = self._restore_step(s, abstract)
            except ValueError as e:
                if "different run" in str(e):
                    raise
                errors.append(e)
            except Exception as e:            # noqa: BLE001 - any read failure means "unreadable"
                errors.append(e)
            else:
                if unreadable:
                    self._quarantine(unreadable)
                return restored
            unreadable.append(s)
            first_line = str(errors[-1]).strip().splitlines()[0][:200] if str(errors[-1]).strip() else ""
            warnings.warn(f"checkpoint step {s} in {self.directory} cannot be read "
                          f"({type(errors[-1]).__name__}: {first_line}); trying the previous one",
                          RuntimeWarning, stacklevel=3)
        if errors:
            raise ValueError(f"no checkpoint in {self.directory} can be read into this state "
                             f"(steps {steps}); last error: {type(errors[-1]).__name__}: "
                             f"{str(errors[-1]).strip().splitlines()[0][:300] if str(errors[-1]).strip() else ''}")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable step directories aside, so the run can save those steps again."""
        if jax.process_index() == 0:
            target = self.directory / CORRUPT_DIR
            target.mkdir(exist_ok=True)
            for s in steps:
                src = self.directory / str(s)
                if src.exists():
                    dst = target / str(s)
                    n = 1
                    while dst.exists():
                        dst, n = target / f"{s}.{n}", n + 1
                    shutil.move(str(src), str(dst))
        self._manager.close()
        self._manager = self._new_manager()

    def wait(self) -> None:
        """Blocks until an asynchronous save has finished writing."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        self._restore_unraisable_hook()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
