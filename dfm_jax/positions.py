"""Token positions: fixed sin-cos embeddings and axial rotary embeddings (2D images, 3D video).

A token grid is described by its sizes per axis, e.g. ``(gh, gw)`` for images or
``(gt, gh, gw)`` for videos; tokens are ordered row-major over that grid.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _split_dim(dim: int, num_axes: int, multiple: int) -> list[int]:
  """Splits ``dim`` into ``num_axes`` parts, multiples of ``multiple``, as even as possible."""
  if dim % (multiple * num_axes) == 0:
    return [dim // num_axes] * num_axes
  units = dim // multiple
  parts = [units // num_axes] * num_axes
  for i in range(units - sum(parts)):
    parts[i] += 1
  if min(parts) == 0:
    raise ValueError(f"dimension {dim} is too small for {num_axes} position axes")
  return [p * multiple for p in parts]


def grid_coordinates(grid: Sequence[int]) -> np.ndarray:
  """``[N, len(grid)]`` float32 integer coordinates of a row-major token grid."""
  mesh = np.meshgrid(*[np.arange(g, dtype=np.float32) for g in grid], indexing="ij")
  return np.stack([m.reshape(-1) for m in mesh], axis=-1)


def sincos_embedding(dim: int, grid: Sequence[int], base_size: int | None = None) -> np.ndarray:
  """Fixed sin-cos positions ``[N, dim]`` (the DiT / MAE embedding, one block of dims per axis).

  ``base_size`` rescales coordinates so grids of different sizes share a frequency range.
  """
  coords = grid_coordinates(grid)
  if base_size is not None:
    coords = coords * (base_size / np.asarray(grid, np.float32))
  parts = _split_dim(dim, len(grid), 2)
  out = []
  for axis, d in enumerate(parts):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
    angles = coords[:, axis : axis + 1].astype(np.float64) * omega[None, :]
    out += [np.sin(angles), np.cos(angles)]
  return np.concatenate(out, axis=-1).astype(np.float32)


def rope_frequencies(
  head_dim: int, grid: Sequence[int], theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
  """Axial RoPE tables ``cos, sin`` of shape ``[N, head_dim // 2]``.

  The head dimension is split across the grid axes (height/width, or time/height/width); each
  axis rotates its own pairs of channels by its coordinate times a geometric frequency ladder.
  """
  coords = grid_coordinates(grid)
  parts = _split_dim(head_dim, len(grid), 2)
  angles = []
  for axis, d in enumerate(parts):
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles.append(coords[:, axis : axis + 1].astype(np.float64) * freqs[None, :])
  angles = np.concatenate(angles, axis=-1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [B, N, H, Dh]`` by tables ``[N, Dh // 2]`` (pairs are adjacent channels)."""
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  x1, x2 = x[..., 0], x[..., 1]
  c = cos[None, :, None, :]
  s = sin[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(out.shape[:-2] + (-1,)).astype(dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features ``[B, dim]`` of scalar times ``t [B]`` (the DiT timestep features)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb
