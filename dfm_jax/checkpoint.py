"""Orbax checkpoints: train state and Grain iterator saved together, async, atomic, keep latest N.

Each step directory is written under a temporary name and renamed when complete, so a process
killed at any moment (even inside an async save) leaves the latest complete checkpoint intact;
an unfinished temporary directory is ignored on restart.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx


class Checkpointer:
  """Saves and restores ``{'state': nnx.State, 'data_iter': grain iterator}`` by step."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        atomicity_options=ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.ATOMIC_RENAME))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: nnx.State, data_iter: Any | None = None) -> None:
    """Starts saving ``state`` (and the iterator position) at ``step``; returns at once if async."""
    items = {"state": ocp.args.StandardSave(state.to_pure_dict())}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: nnx.State,
              data_iter: Any | None = None) -> nnx.State:
    """Restores into ``abstract_state`` (its ``jax.ShapeDtypeStruct`` leaves carry shardings).

    The iterator, if given, is moved in place to the saved position.
    """
    target = abstract_state.to_pure_dict()
    self._check_structure(step, target)
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored["state"])
    return state

  def _check_structure(self, step: int, target: dict) -> None:
    """Raises a short ValueError when the saved tree differs from ``target`` (Orbax's own error
    dumps both whole trees)."""
    path = epath.Path(self.directory) / str(step) / "state"
    saved = _shapes(ocp.StandardCheckpointHandler().metadata(path))
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
      lines.append("  shape differs: " + show(
          [f"{k} saved {saved[k]} vs model {wanted[k]}" for k in reshaped]))
    lines.append("It was written by a different config or code version: restore with the config "
                 "saved beside it (workdir/config.json) or start a fresh workdir.")
    raise ValueError("\n".join(lines))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'/'-joined key path: shape} of a nested dict of arrays or array metadata."""
  def name(entry):
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))
  return {"/".join(name(e) for e in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file + rename) on process 0."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
