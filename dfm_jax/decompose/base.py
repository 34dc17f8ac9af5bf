"""The decomposition interface: geometry, standardisation and previews shared by every kind.

A decomposition splits a sample into S stages, coarse to fine, linearly and exactly invertibly,
as pure (jit-, vmap- and grad-able) functions. Shapes: images ``[B, H, W, C]``, videos
``[B, T, H, W, C]``. For videos only space is halved unless ``halve_time=True``.

``stage_upsample`` (one integer factor k >= 1 per stage, () = all 1) represents stage s at k
times its size along the halved axes: ``split`` repeats each value k times per axis (nearest
upsampling), so the flow of that stage (noise, velocity) lives on the larger grid, and ``merge``
averages each k-wide block back before recomposing. ``down(up(x)) == x`` exactly, so the
decomposition stays exactly invertible. Fine-tuning a pretrained single-stage model uses it to
let a coarse stage keep the pretrained patch size (paper section 4.5, appendix E).

Kinds register themselves by name in :data:`DECOMPOSITIONS` (see ``pyramid.py``, ``wavelet.py``)
and implement ``_split`` / ``_merge`` (and ``_stage_shape`` when a stage is not simply the input
halved ``stage_level(s)`` times).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.registry import Registry

DECOMPOSITIONS: Registry = Registry("decomposition")


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
class Decomposition(abc.ABC):
  """A linear, exactly invertible split of ``[B, H, W, C]`` or ``[B, T, H, W, C]`` into stages.

  Use :func:`dfm_jax.decompose.build` to make one. ``split`` returns a tuple of S arrays, coarse
  to fine; ``merge`` inverts it to float32 round-off. With ``stats`` set, ``split`` standardises
  each stage and ``merge`` undoes it.
  """

  kind: ClassVar[str] = ""
  num_stages: int = 2
  halve_time: bool = False
  stats: StageStats | None = None
  level_gaps: tuple[int, ...] = ()  # halvings between consecutive stages; () = all 1
  stage_upsample: tuple[int, ...] = ()  # per-stage nearest-upsampling factor; () = all 1

  def __post_init__(self):
    if not isinstance(self.num_stages, (int, np.integer)) or self.num_stages < 1:
      raise ValueError(f"num_stages must be an integer >= 1, got {self.num_stages!r}")
    gaps = tuple(int(g) for g in self.level_gaps)
    object.__setattr__(self, "level_gaps", gaps)
    if gaps and (len(gaps) != self.num_stages - 1 or min(gaps) < 1):
      raise ValueError(f"level_gaps needs {self.num_stages - 1} entries >= 1, got {gaps}")
    ups = tuple(int(k) for k in self.stage_upsample)
    object.__setattr__(self, "stage_upsample", ups)
    if ups and (len(ups) != self.num_stages or min(ups) < 1):
      raise ValueError(f"stage_upsample needs {self.num_stages} factors >= 1, got {ups}")
    if isinstance(self.stats, dict):
      object.__setattr__(self, "stats", StageStats.from_dict(self.stats))
    if self.stats is not None and len(self.stats.mean) != self.num_stages:
      raise ValueError(
        f"stats hold {len(self.stats.mean)} stages, decomposition has {self.num_stages}"
      )

  @property
  def gaps(self) -> tuple[int, ...]:
    return self.level_gaps or (1,) * (self.num_stages - 1)

  @property
  def upsample(self) -> tuple[int, ...]:
    return self.stage_upsample or (1,) * self.num_stages

  def stage_level(self, s: int) -> int:
    """How many times stage s (0-based) is halved relative to the input."""
    return sum(self.gaps[s:])

  # -- geometry -------------------------------------------------------------------------------

  def halved_axes(self, ndim: int) -> tuple[int, ...]:
    """The axes that each level halves, for an input of rank ``ndim`` (4 image, 5 video)."""
    if ndim == 4:
      return (1, 2)
    if ndim == 5:
      return (1, 2, 3) if self.halve_time else (2, 3)
    raise ValueError(
      f"expected an image batch [B, H, W, C] or a video batch [B, T, H, W, C], got rank {ndim}"
    )

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
      factor = (2**levels) * int(minimum)
      n = shape[axis]
      if n % factor == 0 and n >= factor:
        continue
      lower = (n // factor) * factor
      nearest = [v for v in (lower, lower + factor) if v > 0]
      what = f"divisible by {factor}"
      if minimum > 1:
        what += (
          f" (2^{levels} for {self.num_stages} stages times the coarsest stage's "
          f"patch size {minimum})"
        )
      raise ValueError(
        f"input shape {shape} cannot be split into {self.num_stages} stages "
        f"({self.kind}): axis {axis} has size {n}, which must be {what}; "
        f"nearest sizes that work: {', '.join(map(str, nearest))}"
      )

  def _stage_shape(self, s: int, shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple:
    """Shape of stage s: the input halved ``stage_level(s)`` times along ``axes``."""
    out = list(shape)
    for a in axes:
      out[a] //= 2 ** self.stage_level(s)
    return tuple(out)

  def stage_shapes(self, shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The shape of every stage, coarse to fine, for an input of ``shape``."""
    shape = tuple(int(d) for d in shape)
    self.check_shape(shape)
    axes = self.halved_axes(len(shape))
    out = []
    for s, k in zip(range(self.num_stages), self.upsample):
      stage = list(self._stage_shape(s, shape, axes))
      for a in axes:
        stage[a] *= k
      out.append(tuple(stage))
    return tuple(out)

  # -- transforms -----------------------------------------------------------------------------

  def split(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """``x [B, (T,) H, W, C]`` -> tuple of S stages, coarse to fine (standardised if stats)."""
    self.check_shape(x.shape)
    stages = self._split(x, self.halved_axes(x.ndim))
    if self.stats is not None:
      stages = tuple((st - m) / s for st, m, s in zip(stages, self.stats.mean, self.stats.std))
    axes = self.halved_axes(x.ndim)
    return tuple(upsample(st, k, axes) for st, k in zip(stages, self.upsample))

  def merge(self, stages: Sequence[jax.Array]) -> jax.Array:
    """Inverse of :meth:`split`: tuple of S stages, coarse to fine -> ``x``."""
    if len(stages) != self.num_stages:
      raise ValueError(f"expected {self.num_stages} stages, got {len(stages)}")
    axes = self.halved_axes(stages[0].ndim)
    stages = [downsample(st, k, axes) for st, k in zip(stages, self.upsample)]
    if self.stats is not None:
      stages = [st * s + m for st, m, s in zip(stages, self.stats.mean, self.stats.std)]
    return self._merge(list(stages), axes)

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
    return dataclasses.replace(self, stats=stats)

  # -- implemented by each kind ---------------------------------------------------------------

  @abc.abstractmethod
  def _split(self, x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Raw stages of ``x`` (no standardisation), halving ``axes`` per level."""

  @abc.abstractmethod
  def _merge(self, stages: list[jax.Array], axes: tuple[int, ...]) -> jax.Array:
    """Inverse of :meth:`_split`."""


def upsample(x: jax.Array, k: int, axes: Sequence[int]) -> jax.Array:
  """Nearest upsampling: every value repeated ``k`` times along each of ``axes``."""
  for a in axes if k > 1 else ():
    x = jnp.repeat(x, k, axis=a)
  return x


def downsample(x: jax.Array, k: int, axes: Sequence[int]) -> jax.Array:
  """Mean over ``k``-wide blocks along each of ``axes``; ``downsample(upsample(x)) == x``."""
  for a in axes if k > 1 else ():
    shape = x.shape[:a] + (x.shape[a] // k, k) + x.shape[a + 1 :]
    x = x.reshape(shape).mean(axis=a + 1)
  return x


def estimate_stats(decomposition: Decomposition, batches, eps: float = 1e-6) -> StageStats:
  """Per-stage mean and std over an iterable of data batches ``[B, (T,) H, W, C]``.

  Uses running float64 sums, so any number of batches fits in memory.
  """
  raw = decomposition.with_stats(None)
  return split_stats(jax.jit(raw.split), raw.num_stages, batches, eps)


def split_stats(split, num_stages: int, batches, eps: float = 1e-6) -> StageStats:
  """Mean and std of each of the ``num_stages`` arrays ``split(batch)`` returns, over an
  iterable of data batches (running float64 sums)."""
  sums = np.zeros(num_stages)
  sq = np.zeros(num_stages)
  counts = np.zeros(num_stages)
  for batch in batches:
    for s, st in enumerate(split(jnp.asarray(batch))):
      st = np.asarray(st, np.float64)
      sums[s] += st.sum()
      sq[s] += np.square(st).sum()
      counts[s] += st.size
  if not counts.all():
    raise ValueError("estimate_stats needs at least one batch")
  mean = sums / counts
  std = np.sqrt(np.maximum(sq / counts - mean**2, 0.0)) + eps
  return StageStats(tuple(mean.tolist()), tuple(std.tolist()))
