"""Device mesh, logical-axis sharding rules and batch placement.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ...; see ``dit.py``). A rules
table from the config maps them to the mesh axes ``data``, ``fsdp`` and ``tensor``. A dimension
whose size the mesh axis does not divide is replicated instead, so small models run on any mesh.

The same table names the activations' axes (``batch``, ``tokens``, ``embed_act``; see
:func:`activation_spec`); a rule may map a name to one mesh axis, a tuple of them, or None.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(
  shape: Sequence[int], devices=None, dcn_shape: Sequence[int] | None = None
) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all), e.g. from ``mesh_shape``.

  Each mesh axis is laid along whole axes of the TPU torus where it can be. Where it cannot (a
  128-way axis on a 16x16 slice), the physical axes are split instead: the same devices and the
  same program, with some of that axis's collectives crossing more links.

  ``dcn_shape`` (``mesh.dcn_shape``; None or all 1: one slice): how many granules each axis
  spans over the data-centre network, e.g. ``(4, 1, 1)`` for data parallelism over 4 TPU slices
  (multislice) while fsdp and tensor stay inside a slice's ICI. Granules are TPU slices
  (``slice_index``) when the devices span several, else processes (GPU or CPU hosts). Each
  entry divides ``shape``'s.
  """
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if dcn_shape is not None and int(np.prod(dcn_shape)) > 1:
    devices = list(devices if devices is not None else jax.devices())
    if any(s % d for s, d in zip(shape, dcn_shape)):
      raise ValueError(
        f"mesh.dcn_shape {tuple(dcn_shape)} does not divide mesh.shape {tuple(shape)}"
      )
    ici = tuple(s // d for s, d in zip(shape, dcn_shape))
    try:
      grid = mesh_utils.create_hybrid_device_mesh(
        ici,
        tuple(dcn_shape),
        devices,
        process_is_granule=len({getattr(d, "slice_index", 0) for d in devices}) == 1,
        allow_split_physical_axes=True,
      )
    except (AssertionError, ValueError, NotImplementedError) as e:
      raise ValueError(
        f"mesh.dcn_shape {tuple(dcn_shape)}: the devices do not form that many granules "
        f"(slices or processes) of {int(np.prod(ici))} devices each: {e}"
      ) from e
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
  try:
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices, axis_types=axis_types)
  except NotImplementedError:
    try:
      grid = mesh_utils.create_device_mesh(
        tuple(shape),
        devices if devices is not None else jax.devices(),
        allow_split_physical_axes=True,
      )
    except NotImplementedError as e:
      raise ValueError(f"mesh {tuple(shape)} cannot be laid over the devices' torus: {e}") from e
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def _mesh_axes(axis, size: int, mesh, used: set[str]):
  """``axis`` (a mesh axis name, a tuple of them, or None) without size-1 axes, or None when it
  reuses an axis of ``used`` or does not divide ``size``; the result is a name or a tuple."""
  if axis is None:
    return None
  names = tuple(a for a in ((axis,) if isinstance(axis, str) else tuple(axis)) if mesh.shape[a] > 1)
  if not names or any(a in used for a in names):
    return None
  if size % int(np.prod([mesh.shape[a] for a in names])):
    return None
  used.update(names)
  return names[0] if len(names) == 1 else names


def logical_to_mesh_spec(
  logical: Sequence[str | None],
  shape: Sequence[int],
  rules: Sequence[tuple[str, str | tuple[str, ...] | None]],
  mesh: jax.sharding.Mesh,
) -> P:
  """Maps logical axis names to a PartitionSpec, never reusing a mesh axis in one spec."""
  table = dict(rules)
  used: set[str] = set()
  return P(
    *(
      _mesh_axes(table.get(name) if name else None, size, mesh, used)
      for name, size in zip(logical, shape)
    )
  )


def activation_spec(
  logical: Sequence[str | None],
  shape: Sequence[int],
  rules: Sequence[tuple[str, str | tuple[str, ...] | None]],
  mesh,
  undivisible=P.UNCONSTRAINED,
) -> P:
  """A PartitionSpec for an activation of ``shape`` with logical axis names ``logical``.

  A name ruled to None is replicated; a name without a rule, or whose mesh axes are taken or do
  not divide the size (e.g. a sampler batch), gets ``undivisible`` (default: unconstrained, so
  XLA keeps whatever sharding it has). ``mesh`` may be abstract (``jax.sharding.get_abstract_mesh``).
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, size in zip(logical, shape):
    if name is None or name not in table:
      out.append(undivisible if name is not None else None)
      continue
    axis = table[name]
    if axis is None:
      out.append(None)
      continue
    resolved = _mesh_axes(axis, size, mesh, used)
    # Every named axis of size 1: nothing to split, replicated is exact.
    trivial = all(mesh.shape[a] == 1 for a in ((axis,) if isinstance(axis, str) else axis))
    out.append(resolved if resolved is not None else (None if trivial else undivisible))
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


def batch_devices(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch sharding splits a batch: the product of the BATCH_AXES sizes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles per-process batches ``[B_local, ...]`` into global arrays ``[B_global, ...]``."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }
