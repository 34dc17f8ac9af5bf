"""An automatic stage schedule: steps per stage and thresholds from the bands' statistics.

Time convention: ``x_t = t * x1 + (1 - t) * x0``, t = 0 noise, t = 1 data. The paper sets the
sampler's steps per stage and thresholds by hand and names choosing them automatically as future
work. Here they follow from each band's std ``sigma_s`` (as the model sees it: after
standardisation, if any) under a Gaussian model of every band (zero mean, independent
elements):

- **Thresholds.** The posterior mean of a Gaussian band explains the fraction
  ``r(t) = t^2 sigma^2 / (t^2 sigma^2 + (1 - t)^2)`` of its variance at time t. Stage s hands
  over to stage s + 1 when ``r = rho`` (0.9 by default), at ``t = k / (sigma + k)`` with
  ``k = sqrt(rho / (1 - rho))``: a faint band (small sigma) is resolved later, so its successor
  starts later.
- **Steps.** For a Gaussian band the Euler sampler is linear in its state, so the variance it
  ends with is a closed form of the schedule (:func:`gaussian_variance_kept`); the split of the
  total steps over the phases is the one that keeps every band's variance closest to the data's
  (least squares in log variance). Few steps near t = 1 shrink a faint band most, because the
  last Euler step lands on the posterior mean, whose variance is ``r(t) sigma^2``.

``bench/oracle.py`` measures the result against hand-set schedules with the exact optimal
velocity of a data set (:mod:`dfm_jax.oracle`), which the Gaussian model only approximates.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from dfm_jax import sampler as sampler_lib

DEFAULT_RHO = 0.9
_MIN_GAP = 0.01  # thresholds must increase strictly


def gaussian_variance_kept(
  stds: Sequence[float], steps_per_stage: Sequence[int], thresholds: Sequence[float]
) -> np.ndarray:
  """``[S]``: the variance of each band after the Euler stage sampler, over the band's own
  variance ``sigma_s^2``, when band s is Gaussian ``N(0, sigma_s^2)`` per element and the
  sampler uses the exact optimal velocity ``(E[X | x_t] - x_t) / (1 - t)``. 1 is exact.

  Each band starts as unit noise; an Euler step from t to t + dt multiplies it by
  ``1 + dt (g(t) - 1) / (1 - t)`` with ``g(t) = t sigma^2 / (t^2 sigma^2 + (1 - t)^2)``.
  """
  var = np.square(np.asarray(stds, np.float64))
  times, _ = sampler_lib.stage_schedule(steps_per_stage, thresholds)
  times = times.astype(np.float64)
  log_gain = np.zeros(len(var))
  for t0, t1 in zip(times[:-1], times[1:]):
    dt = t1 - t0
    moving = dt > 0
    t = np.where(moving, t0, 0.0)  # a finished stage (t0 = 1) does not move
    g = t * var / (np.square(t) * var + np.square(1.0 - t))
    factor = 1.0 + dt * (g - 1.0) / np.maximum(1.0 - t, 1e-12)
    log_gain += np.where(moving, 2.0 * np.log(np.maximum(np.abs(factor), 1e-300)), 0.0)
  return np.exp(log_gain) / var


def handover_thresholds(stds: Sequence[float], rho: float = DEFAULT_RHO) -> tuple[float, ...]:
  """The S - 1 thresholds: stage s hands over when its Gaussian posterior explains ``rho`` of its
  variance (``t = k / (sigma_s + k)``, ``k = sqrt(rho / (1 - rho))``), made strictly increasing
  (each at least 0.01 above the one before) and below 1."""
  if not 0.0 < rho < 1.0:
    raise ValueError(f"rho must lie in (0, 1), got {rho}")
  k = np.sqrt(rho / (1.0 - rho))
  out: list[float] = []
  for sigma in list(stds)[:-1]:
    tau = float(k / (float(sigma) + k))
    if out:
      tau = max(tau, out[-1] + _MIN_GAP)
    out.append(min(tau, 0.99))
  if any(b <= a for a, b in zip(out, out[1:])):
    raise ValueError(f"no increasing thresholds below 1 for stds {tuple(stds)}")
  return tuple(round(v, 4) for v in out)


def time_of_gain(sigma: float, rho: float) -> float:
  """The t at which a Gaussian band of std ``sigma`` has the posterior gain ``r(t) = rho``."""
  k = np.sqrt(rho / (1.0 - rho))
  return float(k / (sigma + k))


def training_fraction_in_range(
  sigma: float, loc: float = 0.0, scale: float = 1.0, lo: float = 0.1, hi: float = 0.9
) -> float:
  """The probability that ``t ~ logit-normal(loc, scale)`` (the main stage's training time)
  puts a Gaussian band of std ``sigma`` where it is being resolved: ``lo <= r(t) <= hi``.
  Multiply by the stage's p_q for its share of all training samples."""
  from scipy import special  # pylint: disable=g-import-not-at-top

  a, b = time_of_gain(sigma, lo), time_of_gain(sigma, hi)
  za, zb = (special.logit(a) - loc) / scale, (special.logit(b) - loc) / scale
  return float(special.ndtr(zb) - special.ndtr(za))


def _splits(total: int, num_stages: int):
  """Every way of giving ``total`` steps to ``num_stages`` phases, at least one each."""
  for cuts in itertools.combinations(range(1, total), num_stages - 1):
    bounds = (0,) + cuts + (total,)
    yield tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def auto_schedule(
  stds: Sequence[float], total_steps: int, rho: float = DEFAULT_RHO
) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """``(steps_per_stage, thresholds)`` for bands of std ``stds`` (coarse to fine, as the model
  sees them) and ``total_steps`` Euler steps in all: thresholds from
  :func:`handover_thresholds`, then the split whose :func:`gaussian_variance_kept` is closest
  to 1 in every band (least squares in log variance; ties go to more coarse steps)."""
  stds = tuple(float(s) for s in stds)
  if not stds or min(stds) <= 0:
    raise ValueError(f"band stds must be positive, got {stds}")
  if total_steps < len(stds):
    raise ValueError(f"{len(stds)} stages need at least {len(stds)} steps, got {total_steps}")
  thresholds = handover_thresholds(stds, rho)
  best, best_err = None, np.inf
  for split in sorted(_splits(int(total_steps), len(stds)), reverse=True):
    kept = gaussian_variance_kept(stds, split, thresholds)
    err = float(np.sum(np.square(np.log(np.maximum(kept, 1e-300)))))
    if err < best_err - 1e-12:
      best, best_err = split, err
  return best, thresholds
