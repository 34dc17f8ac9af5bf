"""The multi-level Haar wavelet decomposition (``dwt``).

Averaging normalisation: ``a = (x0 + x1) / 2``, ``d = (x0 - x1) / 2``. Stage 1 is the
approximation band (the box-downsampled sample); stage s > 1 stacks the ``2^k - 1`` detail bands
of one level on the channel axis (k = number of halved axes), so its channel count is
``(2^k - 1) * C``. Stages 1 and 2 share the coarsest size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dfm_jax.decompose.base import DECOMPOSITIONS, Decomposition


def _haar_analysis(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  n = x.shape[axis]
  x = x.reshape(x.shape[:axis] + (n // 2, 2) + x.shape[axis + 1 :])
  x0 = jax.lax.index_in_dim(x, 0, axis=axis + 1, keepdims=False)
  x1 = jax.lax.index_in_dim(x, 1, axis=axis + 1, keepdims=False)
  return (x0 + x1) / 2, (x0 - x1) / 2


def _haar_synthesis(a: jax.Array, d: jax.Array, axis: int) -> jax.Array:
  out = jnp.stack([a + d, a - d], axis=axis + 1)
  return out.reshape(a.shape[:axis] + (2 * a.shape[axis],) + a.shape[axis + 1 :])


@DECOMPOSITIONS.register("dwt")
class HaarWavelet(Decomposition):
  """Haar wavelet stages: approximation band, then one level of detail bands per stage."""

  kind = "dwt"

  def __post_init__(self):
    super().__post_init__()
    if self.level_gaps and max(self.level_gaps) > 1:
      raise ValueError("the dwt decomposition halves once between stages; level_gaps must be 1")

  def _stage_shape(self, s, shape, axes):
    level = self.num_stages - 1 if s == 0 else self.num_stages - s
    out = list(shape)
    for a in axes:
      out[a] //= 2**level
    if s > 0:
      out[-1] *= 2 ** len(axes) - 1
    return tuple(out)

  def _split(self, x, axes):
    details = []
    approx = x
    for _ in range(self.num_stages - 1):
      bands = [approx]
      for a in axes:
        bands = [half for b in bands for half in _haar_analysis(b, a)]
      approx = bands[0]
      details.append(jnp.concatenate(bands[1:], axis=-1))
    return (approx,) + tuple(details[::-1])

  def _merge(self, stages, axes):
    approx = stages[0]
    for det in stages[1:]:
      bands = [approx] + jnp.split(det, 2 ** len(axes) - 1, axis=-1)
      for a in reversed(axes):
        bands = [_haar_synthesis(bands[i], bands[i + 1], a) for i in range(0, len(bands), 2)]
      approx = bands[0]
    return approx
