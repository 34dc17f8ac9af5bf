"""Pyramid decompositions: the paper's Laplacian pyramid and its ideal (DCT-domain) variant.

``X_1 = down^{S-1}(X)``, ``X_s = down^{S-s}(X) - up(down^{S-s+1}(X))``; merging upsamples and
adds level by level. Stage s of S has every halved axis divided by ``2^stage_level(s)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.decompose.base import DECOMPOSITIONS, Decomposition


def _bilinear_down(x: jax.Array, axis: int) -> jax.Array:
  """Bilinear x0.5 (no antialiasing, half-pixel centres): mean of each pair along ``axis``."""
  n = x.shape[axis]
  x = x.reshape(x.shape[:axis] + (n // 2, 2) + x.shape[axis + 1 :])
  return x.mean(axis=axis + 1)


def _bilinear_up(x: jax.Array, axis: int) -> jax.Array:
  """Bilinear x2 with half-pixel centres and clamped edges (PyTorch ``align_corners=False``)."""
  n = x.shape[axis]
  prev = jnp.concatenate(
    [jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)],
    axis=axis,
  )
  nxt = jnp.concatenate(
    [jax.lax.slice_in_dim(x, 1, n, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)],
    axis=axis,
  )
  even = 0.75 * x + 0.25 * prev
  odd = 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1 :])


@functools.lru_cache(maxsize=None)
def _dct_matrix(n: int) -> np.ndarray:
  """Orthonormal DCT-II matrix ``[n, n]`` (rows are frequencies)."""
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
  m[0] /= math.sqrt(2.0)
  return m


@functools.lru_cache(maxsize=None)
def _dct_resample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` ideal resampling: crop or zero-pad DCT coefficients, keep the mean."""
  keep = np.eye(n_out, n_in)  # crops (n_out < n_in) or zero-pads (n_out > n_in) frequencies
  mat = _dct_matrix(n_out).T @ keep @ _dct_matrix(n_in) * math.sqrt(n_out / n_in)
  return mat.astype(np.float32)


def _apply_along(x: jax.Array, mat: np.ndarray, axis: int) -> jax.Array:
  out = jnp.tensordot(
    x, jnp.asarray(mat, x.dtype), axes=[[axis], [1]], precision=jax.lax.Precision.HIGHEST
  )
  return jnp.moveaxis(out, -1, axis)


@DECOMPOSITIONS.register("laplacian")
class Laplacian(Decomposition):
  """The paper's Laplacian pyramid with the re-implementation's resampling: ``down`` is bilinear
  x0.5 without antialiasing (for an exact factor two, the mean of each pair), ``up`` bilinear x2
  with half-pixel centres and edge clamping."""

  kind = "laplacian"

  @staticmethod
  def down(x: jax.Array, axis: int) -> jax.Array:
    return _bilinear_down(x, axis)

  @staticmethod
  def up(x: jax.Array, axis: int) -> jax.Array:
    return _bilinear_up(x, axis)

  def _resample(self, x, axes, fn, times):
    for _ in range(times):
      for a in axes:
        x = fn(x, a)
    return x

  def _split(self, x, axes):
    levels = [x]  # the input at every stage's resolution, fine to coarse
    for gap in reversed(self.gaps):
      levels.append(self._resample(levels[-1], axes, self.down, gap))
    levels = levels[::-1]  # coarse to fine
    stages = [levels[0]]
    for s in range(1, self.num_stages):
      stages.append(levels[s] - self._resample(levels[s - 1], axes, self.up, self.gaps[s - 1]))
    return tuple(stages)

  def _merge(self, stages, axes):
    x = stages[0]
    for gap, st in zip(self.gaps, stages[1:]):
      x = self._resample(x, axes, self.up, gap) + st
    return x


@DECOMPOSITIONS.register("dct")
class DCTPyramid(Laplacian):
  """The same pyramid with ideal (DCT-domain) resampling, so stage s holds exactly the band of
  orthonormal DCT-II frequencies between stage s-1's and stage s's resolution."""

  kind = "dct"

  @staticmethod
  def down(x: jax.Array, axis: int) -> jax.Array:
    n = x.shape[axis]
    return _apply_along(x, _dct_resample_matrix(n, n // 2), axis)

  @staticmethod
  def up(x: jax.Array, axis: int) -> jax.Array:
    n = x.shape[axis]
    return _apply_along(x, _dct_resample_matrix(n, 2 * n), axis)
