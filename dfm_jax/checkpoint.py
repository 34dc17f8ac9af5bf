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
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored["state"])
    return state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file + rename) on process 0."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
