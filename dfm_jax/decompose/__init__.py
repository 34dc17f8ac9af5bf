"""Multiscale decompositions: split a sample into S stages, coarse to fine, and merge them back.

Every kind is linear, exactly invertible and pure, and registered by name in
:data:`DECOMPOSITIONS`: ``laplacian`` (the paper's default), ``dct`` (ideal band split) and
``dwt`` (Haar wavelets). ``build(kind, num_stages)`` makes one::

  dec = decompose.build("laplacian", num_stages=3)
  stages = dec.split(x)          # x [B, H, W, C] or [B, T, H, W, C] -> S arrays, coarse to fine
  x_again = dec.merge(stages)
"""

from __future__ import annotations

from typing import Sequence

from dfm_jax.decompose import pyramid, wavelet  # noqa: F401  (registers the kinds)
from dfm_jax.decompose.base import DECOMPOSITIONS, Decomposition, StageStats, estimate_stats

KINDS = DECOMPOSITIONS.names()

__all__ = ["DECOMPOSITIONS", "KINDS", "Decomposition", "StageStats", "build", "estimate_stats"]


def build(
  kind: str = "laplacian",
  num_stages: int = 2,
  *,
  halve_time: bool = False,
  stats: StageStats | dict | None = None,
  level_gaps: Sequence[int] | None = None,
  stage_upsample: Sequence[int] | None = None,
) -> Decomposition:
  """Makes a decomposition.

  Args:
    kind: a registered name: ``'laplacian'`` (paper default), ``'dct'`` or ``'dwt'``.
    num_stages: S >= 1; S = 1 is the identity (plain flow matching).
    halve_time: for videos, also halve the time axis at each level.
    stats: optional per-stage standardisation (see :func:`estimate_stats`).
    level_gaps: for the pyramid kinds, the number of halvings between consecutive stages
      (S - 1 entries, default all 1); e.g. ``(2,)`` gives the paper's 256 -> 1024 px split.
    stage_upsample: per-stage nearest-upsampling factors (S entries, default all 1): stage s is
      noised and predicted at that many times its size (see ``Decomposition``).
  """
  cls = DECOMPOSITIONS.get(kind)
  return cls(
    num_stages=num_stages,
    halve_time=bool(halve_time),
    stats=stats,
    level_gaps=tuple(level_gaps) if level_gaps else (),
    stage_upsample=tuple(stage_upsample) if stage_upsample else (),
  )
