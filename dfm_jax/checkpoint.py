"""Orbax checkpoints: train state and Grain iterator saved together, async, atomic, verified.

Each step directory is written under a temporary name and renamed when complete, so a process
killed at any moment (even inside an async save) leaves the latest complete checkpoint intact;
an unfinished temporary directory is ignored on restart. On object stores (``gs://``), where a
rename copies every object, a step is written in place and marked complete by Orbax's
``commit_success.txt``, written last; a step directory without it is unfinished and ignored.
All directory work goes through ``etils.epath``, so ``directory`` may be local or ``gs://``.

Integrity. Every step also holds an ``integrity`` item (a JSON manifest, written by the same
atomic save, so a step directory has it or is not finalized) with

* one 64-bit checksum per array of the state, plus its shape and dtype, and
* the SHA-256 of each process's data-iterator state file (``data_iter/process_P-of-N.json``).

The array checksums (``checksums.array_checksums``) depend only on each array's global
contents, shape and dtype, not on its sharding, so a checkpoint written on 8 devices verifies
when restored on 1. On multi-process runs they are collectives over the global arrays (every
process calls ``save``/``restore`` anyway); each process checks its own data-iterator file, and
the verdicts are combined with ``multihost_utils.process_allgather`` so that all processes agree
on whether a step is intact.

``restore`` verifies the checksums of the arrays it actually restored (on device, after the
transfer) before returning them, and the iterator file before the iterator is moved to it, so a
damaged value is never handed back. ``restore_latest`` walks back from the newest step: a step
that is damaged, truncated or incomplete is named in one warning line, moved aside to
``<directory>/quarantine/<step>-<reason>`` (never deleted) and the next older step is tried.
Checkpoints written before the manifest existed restore with one warning and no verification.

Failed saves. An asynchronous save that fails in the background (disk full, permissions,
storage errors) raises ``CheckpointSaveError`` -- one line naming the step, the cause and the
newest complete step -- from the next ``save``/``wait``/``close`` call, or from ``check()``,
which a loop may call after every step (it does not block). The failed step is never finalized
(its temporary directory is left for Orbax to clean up) and older checkpoints are not deleted for
it. The Checkpointer does not retry: the caller is expected to stop the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from dfm_jax import checksums, storage
from dfm_jax.errors import CheckpointSaveError, CheckpointCorruptError, CheckpointMismatchError

MANIFEST_FORMAT = "dfm_jax.checkpoint_integrity/1"
CHECKSUM_ALGORITHM = "fmix32-sum-x2/1"
INTEGRITY_ITEM = "integrity"
QUARANTINE_DIR = "quarantine"
_MANIFEST_FILE = "metadata"  # what ocp.args.JsonSave writes inside the item directory
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_COMMIT_FILE = "commit_success.txt"  # Orbax's completion marker of a step written in place

_log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores ``{'state': nnx.State, 'data_iter': grain iterator}`` by step."""

  def __init__(
    self, directory: str, *, keep: int = 3, async_save: bool = True, facts: dict | None = None
  ):
    """``facts``: JSON values the run was set up with outside the state (the per-stage
    standardisation statistics, read back by :func:`saved_facts`), saved in every step's manifest
    and compared on restore: a checkpoint copied from a run with other facts is refused
    (CheckpointMismatchError) instead of resuming with this workdir's."""
    self.directory = _absolute(directory)
    self.facts = json.loads(json.dumps(facts)) if facts else None
    mode = (
      ocp.options.AtomicityMode.COMMIT_FILE
      if storage.is_remote(self.directory)
      else ocp.options.AtomicityMode.ATOMIC_RENAME
    )
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      atomicity_options=ocp.options.AtomicityOptions(mode=mode),
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data_iter", INTEGRITY_ITEM)
    )
    self._in_flight: int | None = None  # the step of the last save dispatched

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  # ------------------------------------------------------------------------------------- save

  def save(self, step: int, state: nnx.State, data_iter: Any | None = None) -> None:
    """Starts saving ``state`` (and the iterator position) at ``step``; returns at once if async.

    Raises:
      CheckpointSaveError: this save, or the previous asynchronous one, failed.
    """
    self.wait()  # surfaces a failure of the previous save before starting this one
    pure = nnx.to_pure_dict(state)
    try:
      manifest = build_manifest(step, pure, data_iter)
      if self.facts:
        manifest["facts"] = self.facts
      items = {"state": ocp.args.StandardSave(pure), INTEGRITY_ITEM: ocp.args.JsonSave(manifest)}
      if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
      self._in_flight = step
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._in_flight = None
      raise self._save_error(step, e) from e

  def check(self) -> None:
    """Raises ``CheckpointSaveError`` now if a finished asynchronous save failed; never blocks.

    Single-process only (on multi-process runs it returns at once: there the failure surfaces
    from the next ``save``/``wait``/``close``, which every process calls).
    """
    if self._in_flight is None or jax.process_count() > 1:
      return
    if not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the pending save is written. Raises ``CheckpointSaveError`` if it failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e

  def close(self) -> None:
    """Waits for the pending save and closes the manager (also when the save failed)."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def _save_error(self, step: int | None, cause: BaseException) -> CheckpointSaveError:
    what = f"step {step}" if step is not None else "a step"
    return self.write_error(f"saving checkpoint {what} to {self.directory}", cause, step)

  def write_error(
    self, what: str, cause: BaseException, step: int | None = None
  ) -> CheckpointSaveError:
    """``"<what> failed: <cause>; the newest complete checkpoint is step N"``: one line for a
    failed write of the run (a checkpoint, or logs and sample grids on a disk that filled up)."""
    try:
      self.manager.reload()
      good = self.manager.latest_step()
    except Exception:  # pylint: disable=broad-except
      good = None
    last = (
      f"the newest complete checkpoint is step {good}"
      if good is not None
      else "there is no complete checkpoint"
    )
    reason = _one_line(cause)
    if disk_full(cause):
      reason = f"the disk is full ({reason})"
    return CheckpointSaveError(f"{what} failed: {reason}; {last}", step)

  # ---------------------------------------------------------------------------------- restore

  def restore(
    self, step: int, abstract_state: nnx.State, data_iter: Any | None = None
  ) -> nnx.State:
    """Restores into ``abstract_state`` (its ``jax.ShapeDtypeStruct`` leaves carry shardings),
    verifying every array and the iterator state against the step's checksums.

    The iterator, if given, is moved in place to the saved position, and only after everything
    was verified.

    Raises:
      CheckpointCorruptError: the step is damaged (nothing is returned or moved).
      CheckpointMismatchError: the step is intact but belongs to a different model.
    """
    step_dir = epath.Path(self.directory) / str(step)
    ok, error = True, None
    try:
      items = _saved_items(step, step_dir)
      manifest = _read_manifest(step, step_dir) if INTEGRITY_ITEM in items else None
      target = nnx.to_pure_dict(abstract_state)
      self._check_structure(step, target)
      self._check_facts(step, manifest)
      if manifest is None:
        _log.warning(
          "checkpoint step %d has no checksums (written before integrity checks); "
          "restoring it unverified",
          step,
        )
      restore_iter = data_iter is not None and "data_iter" in items
      if data_iter is not None and not restore_iter:
        _log.warning(
          "checkpoint step %d holds no data-iterator state; the iterator starts from its beginning",
          step,
        )
      if restore_iter and manifest is not None:
        _verify_iterator_file(step, step_dir, manifest)
      # Arrays are restored in their saved dtype, verified, then cast to the model's.
      as_saved = _saved_dtypes(target, manifest) if manifest is not None else target
      try:
        restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(as_saved))
        )["state"]
      except Exception as e:  # pylint: disable=broad-except
        _raise_if_not_damage(e)
        raise CheckpointCorruptError(step, "unreadable", _one_line(e)) from e
      if manifest is not None:
        _verify_arrays(step, restored, manifest)
        restored = jax.tree.map(
          lambda x, t: x.astype(t.dtype) if x.dtype != t.dtype else x, restored, target
        )
    except CheckpointCorruptError as e:
      ok, error = False, e
    if not _all_processes_agree(ok):
      raise error or CheckpointCorruptError(
        step, "other-process", "another process found it damaged"
      )
    if restore_iter:
      try:
        self.manager.restore(
          step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(data_iter))
        )
      except Exception as e:  # pylint: disable=broad-except
        _raise_if_not_damage(e)
        raise CheckpointCorruptError(step, "data-iter", _one_line(e)) from e
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state

  def _check_facts(self, step: int, manifest: dict | None) -> None:
    saved = (manifest or {}).get("facts") or {}
    for name, value in (self.facts or {}).items():
      if name in saved and saved[name] != value:
        raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} was trained with other {name} than this run's "
          f"(saved {json.dumps(saved[name])[:200]}, this run {json.dumps(value)[:200]}): it "
          "comes from another run; copy that run's workdir files with it, or start afresh"
        )

  def restore_latest(
    self, abstract_state: nnx.State, data_iter: Any | None = None
  ) -> tuple[int, nnx.State] | tuple[None, None]:
    """Restores the newest intact step: ``(step, state)``, or ``(None, None)`` if none is left.

    Each damaged step met on the way (newest first) is named in one warning line and moved to
    ``<directory>/quarantine/<step>-<reason>``. ``CheckpointMismatchError`` (a different model)
    propagates and moves nothing.
    """
    for step in sorted(self._candidate_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_state, data_iter)
      except CheckpointCorruptError as e:
        where = self.quarantine(step, e.reason)
        _log.warning("%s; moved it to %s and trying the previous step", e, where)
    if (epath.Path(self.directory) / QUARANTINE_DIR).is_dir():
      _log.warning(
        "no intact checkpoint left in %s (damaged steps are in %s/)", self.directory, QUARANTINE_DIR
      )
    return None, None

  def quarantine(self, step: int, reason: str) -> str:
    """Moves step ``step`` to ``<directory>/quarantine/<step>-<reason>[-k]`` (process 0 renames,
    all processes wait); returns the new path."""
    source = epath.Path(self.directory) / str(step)
    folder = epath.Path(self.directory) / QUARANTINE_DIR
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in reason)[:40] or "damaged"
    target = folder / f"{step}-{slug}"
    if jax.process_index() == 0:
      folder.mkdir(parents=True, exist_ok=True)
      k = 1
      while target.exists():
        k += 1
        target = folder / f"{step}-{slug}-{k}"
      if source.exists():
        _move_dir(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"dfm_jax_quarantine_{step}")
    self.manager.reload()
    return os.fspath(target)

  def _candidate_steps(self) -> set[int]:
    """Finalized steps plus step directories Orbax does not list (e.g. damaged metadata); on
    object stores only those holding the commit file (the others are unfinished saves)."""
    root, on_disk = epath.Path(self.directory), set()
    if root.is_dir():
      url = storage.is_remote(self.directory)
      on_disk = {
        int(p.name)
        for p in root.iterdir()
        if p.name.isdigit() and p.is_dir() and (not url or (p / _COMMIT_FILE).exists())
      }
    return on_disk | set(self.manager.all_steps())

  def _check_structure(self, step: int, target: dict) -> None:
    """Raises a short CheckpointMismatchError when the saved tree differs from ``target``
    (Orbax's own error dumps both whole trees); CheckpointCorruptError if the tree metadata
    cannot be read."""
    path = epath.Path(self.directory) / str(step) / "state"
    try:
      saved = _shapes(ocp.StandardCheckpointHandler().metadata(path))
    except Exception as e:  # pylint: disable=broad-except
      _raise_if_not_damage(e)
      raise CheckpointCorruptError(
        step, "metadata", f"cannot read the state's tree metadata: {_one_line(e)}"
      ) from e
    wanted = _shapes(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if not (missing or extra or reshaped):
      return
    show = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    lines = [f"checkpoint {path.parent} does not match the model being restored:"]
    if missing:
      lines.append(f"  missing from the checkpoint: {show(missing)}")
    if extra:
      lines.append(f"  not in the model: {show(extra)}")
    if reshaped:
      lines.append(
        "  shape differs: " + show([f"{k} saved {saved[k]} vs model {wanted[k]}" for k in reshaped])
      )
    lines.append(
      "It was written by a different config or code version: restore with the config "
      "saved beside it (workdir/config.json) or start a fresh workdir."
    )
    raise CheckpointMismatchError("\n".join(lines))


# ------------------------------------------------------------------------------- manifest


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'/'-joined key path: shape} of a nested dict of arrays or array metadata."""

  def shape(leaf):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
      return jax.eval_shape(jax.random.key_data, leaf).shape  # Orbax stores the key data
    return tuple(getattr(leaf, "shape", ()))

  return {
    checksums.leaf_name(path): shape(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _iterator_text(data_iter) -> str:
  """The exact text grain's CheckpointHandler writes for ``data_iter``."""
  if isinstance(data_iter, grain.DatasetIterator):
    return json.dumps(data_iter.get_state(), indent=4)
  return data_iter.get_state().decode()


def build_manifest(step: int, pure_state: dict, data_iter: Any | None) -> dict:
  """The integrity manifest of a step (collective on multi-process runs)."""
  iterator = None
  if data_iter is not None:
    digest = hashlib.sha256(_iterator_text(data_iter).encode()).digest()
    if jax.process_count() > 1:
      rows = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))
      iterator = [bytes(np.asarray(r, np.uint8)).hex() for r in rows]
    else:
      iterator = [digest.hex()]
  return {
    "format": MANIFEST_FORMAT,
    "algorithm": CHECKSUM_ALGORITHM,
    "step": int(step),
    "process_count": jax.process_count(),
    "host": socket.gethostname(),
    "arrays": checksums.array_checksums(pure_state),
    "data_iter_sha256": iterator,
  }


# ------------------------------------------------------------------------------ verification


def saved_facts(directory: str) -> dict | None:
  """The ``facts`` of the newest step in ``directory`` whose manifest reads (``{}`` when it has
  none), without restoring anything; None when no step does (a new run)."""
  root = epath.Path(directory)
  if not root.is_dir():
    return None
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
  for step in steps:
    try:
      return _read_manifest(step, root / str(step)).get("facts") or {}
    except CheckpointCorruptError:
      continue  # restore_latest names and quarantines it
  return None


def _saved_items(step: int, step_dir: epath.Path) -> set[str]:
  """Item names recorded in the step's ``_CHECKPOINT_METADATA``."""
  path = step_dir / _STEP_METADATA_FILE
  try:
    items = json.loads(path.read_text())["item_handlers"]
    if not isinstance(items, dict) or "state" not in items:
      raise ValueError(f"item_handlers {items!r} lists no state")
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_not_damage(e)
    raise CheckpointCorruptError(
      step, "metadata", f"cannot read {path.name}: {_one_line(e)}"
    ) from e
  return set(items)


def _read_manifest(step: int, step_dir: epath.Path) -> dict:
  path = step_dir / INTEGRITY_ITEM / _MANIFEST_FILE
  try:
    manifest = json.loads(path.read_text())
    if (
      not isinstance(manifest, dict)
      or manifest.get("format") != MANIFEST_FORMAT
      or not isinstance(manifest.get("arrays"), dict)
      or not manifest["arrays"]
    ):
      raise ValueError("empty or not a checksum manifest")
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_not_damage(e)
    raise CheckpointCorruptError(
      step, "manifest", f"cannot read {INTEGRITY_ITEM}/{path.name}: {_one_line(e)}"
    ) from e
  if manifest.get("algorithm") != CHECKSUM_ALGORITHM:
    raise CheckpointCorruptError(
      step, "manifest", f"unknown checksum algorithm {manifest.get('algorithm')!r}"
    )
  return manifest


def _saved_dtypes(target: dict, manifest: dict) -> dict:
  """``target`` with each leaf's dtype replaced by the dtype it was saved in."""
  saved = manifest["arrays"]

  def leaf(path, t):
    entry = saved.get(checksums.leaf_name(path))
    if entry is None or str(t.dtype) == entry.get("dtype"):
      return t
    try:
      dtype = jnp.dtype(entry["dtype"])
    except TypeError:  # PRNG keys and other extended dtypes: restore as asked
      return t
    return jax.ShapeDtypeStruct(t.shape, dtype, sharding=getattr(t, "sharding", None))

  return jax.tree_util.tree_map_with_path(leaf, target)


def _verify_iterator_file(step: int, step_dir: epath.Path, manifest: dict) -> None:
  digests = manifest.get("data_iter_sha256")
  index, count = jax.process_index(), jax.process_count()
  if not isinstance(digests, list) or len(digests) != count:
    raise CheckpointCorruptError(
      step,
      "manifest",
      f"it records {len(digests) if isinstance(digests, list) else 'no'} "
      f"data-iterator checksums for {count} process(es)",
    )
  path = step_dir / "data_iter" / f"process_{index}-of-{count}.json"
  try:
    got = hashlib.sha256(path.read_bytes()).hexdigest()
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_not_damage(e)
    raise CheckpointCorruptError(step, "data-iter", f"cannot read {path.name}: {_one_line(e)}")
  if got != digests[index]:
    raise CheckpointCorruptError(
      step, "data-iter", f"data_iter/{path.name} does not match its checksum"
    )


def _verify_arrays(step: int, restored: dict, manifest: dict) -> None:
  expected = manifest["arrays"]
  got = checksums.array_checksums(restored)
  bad = sorted(k for k in got if k not in expected or expected[k] != got[k])
  bad += sorted(k for k in expected if k not in got)
  if bad:
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    raise CheckpointCorruptError(
      step,
      "checksum",
      f"restored values differ from the checksums saved with them in {', '.join(bad[:3])}{more}",
    )


# Errors of the environment, not of the files: they propagate instead of quarantining a step.
_ENVIRONMENT_ERRORS = (
  MemoryError,
  PermissionError,
  ConnectionError,
  TimeoutError,
  InterruptedError,
)
_ENVIRONMENT_CODES = (
  "RESOURCE_EXHAUSTED",
  "out of memory",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "PERMISSION_DENIED",
  "UNAUTHENTICATED",
  "CANCELLED",
  "Permission denied",
)


def _raise_if_not_damage(e: BaseException) -> None:
  """Re-raises ``e`` when it says that memory, permissions or storage access failed, which does
  not make a checkpoint damaged (quarantining it would lose good data)."""
  text = str(e)
  if (
    isinstance(e, _ENVIRONMENT_ERRORS)
    or not isinstance(e, Exception)
    or any(code in text for code in _ENVIRONMENT_CODES)
  ):
    raise e


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _one_line(e: BaseException, limit: int = 300) -> str:
  """``Type: first line of the message`` (OSError: with its errno name), at most ``limit``."""
  text = str(e).strip().splitlines()
  first = text[0] if text else ""
  first = first.split(" See full TensorStore details")[0]  # the rest is a repr of a bound method
  if isinstance(e, OSError) and e.errno in errno.errorcode and not first:
    first = os.strerror(e.errno)
  out = f"{type(e).__name__}: {first}" if first else type(e).__name__
  return out if len(out) <= limit else out[: limit - 3] + "..."


def _move_dir(source: epath.Path, target: epath.Path) -> None:
  """Renames a directory; on object stores (no directories, no rename) copies every object,
  then deletes the source, so an interrupted move leaves the source whole."""
  if not storage.is_remote(os.fspath(source)):
    source.rename(target)
    return

  storage.copy_tree(source, target)
  source.rmtree()


def disk_full(error: BaseException) -> bool:
  """ENOSPC anywhere in the cause chain, as Python or as TensorStore reports it."""
  seen = 0
  while error is not None and seen < 10:
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in text:
      return True
    if "RESOURCE_EXHAUSTED" in text and ("Failed to write" in text or "Error writing" in text):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def _absolute(path: str) -> str:
  """A URL as given; a local path made absolute (Orbax wants absolute directories)."""
  path = os.fspath(path)
  return path if storage.is_remote(path) else os.path.abspath(path)  # a string operation, no I/O
