"""Device mesh, logical-axis sharding rules and batch placement.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ...; see ``dit.py``). A rules
table from the config maps them to the mesh axes ``data``, ``fsdp`` and ``tensor``. A dimension
whose size the mesh axis does not divide is replicated instead, so small models run on any mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all), e.g. from ``mesh_shape``."""
  return jax.make_mesh(
    tuple(shape),
    MESH_AXES,
    devices=devices,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
  )


def logical_to_mesh_spec(
  logical: Sequence[str | None],
  shape: Sequence[int],
  rules: Sequence[tuple[str, str | None]],
  mesh: jax.sharding.Mesh,
) -> P:
  """Maps logical axis names to a PartitionSpec, never reusing a mesh axis in one spec."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, size in zip(logical, shape):
    axis = table.get(name) if name else None
    if axis is not None and (axis in used or size % mesh.shape[axis]):
      axis = None
    if axis is not None and mesh.shape[axis] == 1:
      axis = None
    if axis is not None:
      used.add(axis)
    out.append(axis)
  return P(*out)


def state_shardings(
  abstract_state: nnx.State, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, str | None]]
):
  """NamedShardings for every leaf of an (abstract) NNX state.

  Leaves whose variable has no ``out_sharding`` metadata (counters, caches, optimizer scalars)
  are replicated; optimizer moments inherit the metadata of their parameter and so are sharded
  the same way (FSDP shards both).
  """

  def leaf_sharding(var):
    if not isinstance(var, nnx.Variable):
      return NamedSharding(mesh, P())
    shape = getattr(var.get_value(), "shape", ())
    logical = var.get_metadata().get("out_sharding")
    if not logical or len(logical) != len(shape):
      return var.replace(NamedSharding(mesh, P()))
    return var.replace(NamedSharding(mesh, logical_to_mesh_spec(logical, shape, rules, mesh)))

  return jax.tree.map(leaf_sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch axis split over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles per-process batches ``[B_local, ...]`` into global arrays ``[B_global, ...]``."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }
