"""Multiscale decompositions: split a sample into S stages, coarse to fine, and merge them back.

Every decomposition here is linear, exactly invertible and pure (jit-, vmap- and grad-able):

- ``laplacian``: the paper's Laplacian pyramid. ``down`` is bilinear x0.5 without antialiasing
  (for an exact factor of two that is the mean of each pair of samples), ``up`` is bilinear x2
  with half-pixel centres and edge clamping. ``X_1 = down^{S-1}(X)``,
  ``X_s = down^{S-s}(X) - up(down^{S-s+1}(X))``; merging upsamples and adds level by level.
- ``dct``: the same pyramid with ideal (DCT-domain) resampling, so stage s holds exactly the band
  of orthonormal DCT-II frequencies between stage s-1's and stage s's resolution.
- ``dwt``: a multi-level Haar wavelet transform in the averaging normalisation
  (``a = (x0 + x1) / 2``, ``d = (x0 - x1) / 2``). Stage 1 is the approximation band (the
  box-downsampled sample); stage s > 1 stacks the ``2^k - 1`` detail bands of one level on the
  channel axis (k = number of halved axes), so its channel count is ``(2^k - 1) * C``.

Shapes: images ``[B, H, W, C]``, videos ``[B, T, H, W, C]``. For videos only space is halved
unless ``halve_time=True``. For the pyramid kinds stage s of S has every halved axis divided by
``2^(S-s)``; for ``dwt`` stage 1 and stage 2 share the coarsest size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("laplacian", "dct", "dwt")


# ---------------------------------------------------------------------------------------------
# One-dimensional resampling along an axis.


def _bilinear_down(x: jax.Array, axis: int) -> jax.Array:
  """Bilinear x0.5 (no antialiasing, half-pixel centres): mean of each pair along ``axis``."""
  n = x.shape[axis]
  x = x.reshape(x.shape[:axis] + (n // 2, 2) + x.shape[axis + 1:])
  return x.mean(axis=axis + 1)


def _bilinear_up(x: jax.Array, axis: int) -> jax.Array:
  """Bilinear x2 with half-pixel centres and clamped edges (PyTorch ``align_corners=False``)."""
  n = x.shape[axis]
  prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                          jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                         jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
  even = 0.75 * x + 0.25 * prev
  odd = 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


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
  out = jnp.tensordot(x, jnp.asarray(mat, x.dtype), axes=[[axis], [1]],
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(out, -1, axis)


def _dct_down(x: jax.Array, axis: int) -> jax.Array:
  n = x.shape[axis]
  return _apply_along(x, _dct_resample_matrix(n, n // 2), axis)


def _dct_up(x: jax.Array, axis: int) -> jax.Array:
  n = x.shape[axis]
  return _apply_along(x, _dct_resample_matrix(n, 2 * n), axis)


_RESAMPLERS = {"laplacian": (_bilinear_down, _bilinear_up), "dct": (_dct_down, _dct_up)}


def _haar_analysis(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  n = x.shape[axis]
  x = x.reshape(x.shape[:axis] + (n // 2, 2) + x.shape[axis + 1:])
  x0 = jax.lax.index_in_dim(x, 0, axis=axis + 1, keepdims=False)
  x1 = jax.lax.index_in_dim(x, 1, axis=axis + 1, keepdims=False)
  return (x0 + x1) / 2, (x0 - x1) / 2


def _haar_synthesis(a: jax.Array, d: jax.Array, axis: int) -> jax.Array:
  out = jnp.stack([a + d, a - d], axis=axis + 1)
  return out.reshape(a.shape[:axis] + (2 * a.shape[axis],) + a.shape[axis + 1:])


# ---------------------------------------------------------------------------------------------
# The decomposition object.


@dataclasses.dataclass(frozen=True)
class StageStats:
  """Per-stage standardisation: stage s is stored as ``(X_s - mean[s]) / std[s]``."""
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def to_dict(self) -> dict:
    return {"mean": list(self.mean), "std": list(self.std)}

  @classmethod
  def from_dict(cls, d: dict) -> "StageStats":
    return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


@dataclasses.dataclass(frozen=True)
class Decomposition:
  """A linear, exactly invertible split of ``[B, H, W, C]`` or ``[B, T, H, W, C]`` into stages.

  Use :func:`build` to make one. ``split`` returns a tuple of S arrays, coarse to fine;
  ``merge`` inverts it to float32 round-off. With ``stats`` set, ``split`` standardises each
  stage and ``merge`` undoes it.
  """
  kind: str
  num_stages: int
  halve_time: bool = False
  stats: StageStats | None = None
  level_gaps: tuple[int, ...] = ()  # halvings between consecutive stages; () = all 1

  @property
  def gaps(self) -> tuple[int, ...]:
    return self.level_gaps or (1,) * (self.num_stages - 1)

  def stage_level(self, s: int) -> int:
    """How many times stage s (0-based) is halved relative to the input (pyramid kinds)."""
    return sum(self.gaps[s:])

  # -- geometry ---------------------------------------------------------------------------------

  def halved_axes(self, ndim: int) -> tuple[int, ...]:
    """The axes that each level halves, for an input of rank ``ndim`` (4 image, 5 video)."""
    if ndim == 4:
      return (1, 2)
    if ndim == 5:
      return (1, 2, 3) if self.halve_time else (2, 3)
    raise ValueError(f"expected an image batch [B, H, W, C] or a video batch [B, T, H, W, C], "
                     f"got rank {ndim}")

  def check_shape(self, shape: Sequence[int], min_stage_size: int | Sequence[int] = 1) -> None:
    """Raises ValueError if ``shape`` cannot be split, naming the shape and sizes that work.

    ``min_stage_size`` is the smallest size (per halved axis, or one int for all) the coarsest
    stage may have and must divide; pass the coarsest stage's patch size here.
    """
    shape = tuple(int(d) for d in shape)
    axes = self.halved_axes(len(shape))
    if isinstance(min_stage_size, int):
      min_stage_size = (min_stage_size,) * len(axes)
    levels = sum(self.gaps)
    for axis, minimum in zip(axes, min_stage_size):
      factor = (2 ** levels) * int(minimum)
      n = shape[axis]
      if n % factor == 0 and n >= factor:
        continue
      lower = (n // factor) * factor
      upper = lower + factor
      nearest = [v for v in (lower, upper) if v > 0]
      what = f"divisible by {factor}"
      if minimum > 1:
        what += (f" (2^{levels} for {self.num_stages} stages times the coarsest stage's "
                 f"patch size {minimum})")
      raise ValueError(
          f"input shape {shape} cannot be split into {self.num_stages} stages "
          f"({self.kind}): axis {axis} has size {n}, which must be {what}; "
          f"nearest sizes that work: {', '.join(map(str, nearest))}")

  def stage_shapes(self, shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The shape of every stage, coarse to fine, for an input of ``shape``."""
    shape = tuple(int(d) for d in shape)
    self.check_shape(shape)
    axes = self.halved_axes(len(shape))
    num_bands = 2 ** len(axes) - 1
    out = []
    for s in range(self.num_stages):
      if self.kind == "dwt":
        level = self.num_stages - 1 if s == 0 else self.num_stages - s
      else:
        level = self.stage_level(s)
      st = list(shape)
      for a in axes:
        st[a] //= 2 ** level
      if self.kind == "dwt" and s > 0:
        st[-1] *= num_bands
      out.append(tuple(st))
    return tuple(out)

  # -- transforms --------------------------------------------------------------------------------

  def split(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """``x [B, (T,) H, W, C]`` -> tuple of S stages, coarse to fine (standardised if stats)."""
    self.check_shape(x.shape)
    axes = self.halved_axes(x.ndim)
    stages = self._split_dwt(x, axes) if self.kind == "dwt" else self._split_pyramid(x, axes)
    if self.stats is not None:
      stages = tuple((st - m) / s for st, m, s in zip(stages, self.stats.mean, self.stats.std))
    return stages

  def merge(self, stages: Sequence[jax.Array]) -> jax.Array:
    """Inverse of :meth:`split`: tuple of S stages, coarse to fine -> ``x``."""
    if len(stages) != self.num_stages:
      raise ValueError(f"expected {self.num_stages} stages, got {len(stages)}")
    if self.stats is not None:
      stages = [st * s + m for st, m, s in zip(stages, self.stats.mean, self.stats.std)]
    axes = self.halved_axes(stages[0].ndim)
    return self._merge_dwt(stages, axes) if self.kind == "dwt" else self._merge_pyramid(stages,
                                                                                         axes)

  def preview(self, stages: Sequence[jax.Array], num_done) -> jax.Array:
    """Full-size recomposition of the first ``num_done`` stages, later stages set to zero.

    Zero is taken in the raw (unstandardised) space, so the preview is exactly
    ``Xbar_s = X_1 + ... + X_s`` upsampled to full size. ``num_done`` may be a traced integer.
    """
    if isinstance(num_done, int) and not 1 <= num_done <= self.num_stages:
      raise ValueError(f"num_done must be in 1..{self.num_stages}, got {num_done}")
    stages = list(stages)
    if self.stats is not None:
      stages = [st * s + m for st, m, s in zip(stages, self.stats.mean, self.stats.std)]
    stages = [jnp.where(i < num_done, st, jnp.zeros_like(st)) for i, st in enumerate(stages)]
    return dataclasses.replace(self, stats=None).merge(stages)

  def with_stats(self, stats: StageStats | None) -> "Decomposition":
    if stats is not None and len(stats.mean) != self.num_stages:
      raise ValueError(f"stats hold {len(stats.mean)} stages, decomposition has "
                       f"{self.num_stages}")
    return dataclasses.replace(self, stats=stats)

  # -- implementations ---------------------------------------------------------------------------

  def _resample(self, x, axes, which, times=1):
    fn = _RESAMPLERS[self.kind][which]
    for _ in range(times):
      for a in axes:
        x = fn(x, a)
    return x

  def _split_pyramid(self, x, axes):
    levels = [x]  # the input at every stage's resolution, fine to coarse
    for gap in reversed(self.gaps):
      levels.append(self._resample(levels[-1], axes, 0, gap))
    levels = levels[::-1]  # coarse to fine
    stages = [levels[0]]
    for s in range(1, self.num_stages):
      stages.append(levels[s] - self._resample(levels[s - 1], axes, 1, self.gaps[s - 1]))
    return tuple(stages)

  def _merge_pyramid(self, stages, axes):
    x = stages[0]
    for gap, st in zip(self.gaps, stages[1:]):
      x = self._resample(x, axes, 1, gap) + st
    return x

  def _split_dwt(self, x, axes):
    details = []
    approx = x
    for _ in range(self.num_stages - 1):
      bands = [approx]
      for a in axes:
        bands = [half for b in bands for half in _haar_analysis(b, a)]
      approx = bands[0]
      details.append(jnp.concatenate(bands[1:], axis=-1))
    return (approx,) + tuple(details[::-1])

  def _merge_dwt(self, stages, axes):
    approx = stages[0]
    for det in stages[1:]:
      bands = [approx] + jnp.split(det, 2 ** len(axes) - 1, axis=-1)
      for a in reversed(axes):
        bands = [_haar_synthesis(bands[i], bands[i + 1], a) for i in range(0, len(bands), 2)]
      approx = bands[0]
    return approx


def build(kind: str = "laplacian", num_stages: int = 2, *, halve_time: bool = False,
          stats: StageStats | dict | None = None,
          level_gaps: Sequence[int] | None = None) -> Decomposition:
  """Makes a decomposition.

  Args:
    kind: ``'laplacian'`` (paper default), ``'dct'`` or ``'dwt'``.
    num_stages: S >= 1; S = 1 is the identity (plain flow matching).
    halve_time: for videos, also halve the time axis at each level.
    stats: optional per-stage standardisation (see :func:`estimate_stats`).
    level_gaps: for the pyramid kinds, the number of halvings between consecutive stages
      (S - 1 entries, default all 1); e.g. ``(2,)`` gives the paper's 256 -> 1024 px split.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown decomposition {kind!r}; choose one of {', '.join(KINDS)}")
  if not isinstance(num_stages, (int, np.integer)) or num_stages < 1:
    raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
  if isinstance(stats, dict):
    stats = StageStats.from_dict(stats)
  gaps = tuple(int(g) for g in level_gaps) if level_gaps else ()
  if gaps and (len(gaps) != num_stages - 1 or min(gaps) < 1):
    raise ValueError(f"level_gaps needs {num_stages - 1} entries >= 1, got {tuple(level_gaps)}")
  if gaps and kind == "dwt" and max(gaps) > 1:
    raise ValueError("the dwt decomposition halves once between stages; level_gaps must be 1")
  return Decomposition(kind, int(num_stages), bool(halve_time), level_gaps=gaps).with_stats(stats)


def estimate_stats(decomposition: Decomposition, batches, eps: float = 1e-6) -> StageStats:
  """Per-stage mean and std over an iterable of data batches ``[B, (T,) H, W, C]``.

  Uses running float64 sums, so any number of batches fits in memory.
  """
  raw = decomposition.with_stats(None)
  split = jax.jit(raw.split)
  sums = np.zeros(raw.num_stages)
  sq = np.zeros(raw.num_stages)
  counts = np.zeros(raw.num_stages)
  for batch in batches:
    for s, st in enumerate(split(jnp.asarray(batch))):
      st = np.asarray(st, np.float64)
      sums[s] += st.sum()
      sq[s] += np.square(st).sum()
      counts[s] += st.size
  if not counts.all():
    raise ValueError("estimate_stats needs at least one batch")
  mean = sums / counts
  std = np.sqrt(np.maximum(sq / counts - mean ** 2, 0.0)) + eps
  return StageStats(tuple(mean.tolist()), tuple(std.tolist()))
