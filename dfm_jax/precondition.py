"""Per-stage EDM-style preconditioning (paper appendix A.1) of the velocity network.

Time convention: ``x_t = t * x1 + (1 - t) * x0`` with ``x0 ~ N(0, I)``; t = 0 is noise, t = 1 is
data; the velocity target is ``v = x1 - x0``. Stage s has data mean ``m`` and std ``sigma``
(scalars per stage). With the centred input ``xc = x_t - t * m``:

- ``D(t) = Var(xc) = t^2 sigma^2 + (1 - t)^2``
- ``c_in = 1 / sqrt(D)``: the network input ``c_in * xc`` has unit variance for every t;
- ``c_skip = (t sigma^2 - (1 - t)) / D``: the best linear predictor of ``v - m`` from ``xc``;
- ``c_out = sigma / sqrt(D)``: the std of the residual ``v - m - c_skip * xc``;
- ``v_pred = m + c_skip * xc + c_out * F(c_in * xc, t, ...)``.

The network target ``(v - m - c_skip * xc) / c_out`` then has unit variance for every t, and
``||F - target||^2 = ||v_pred - v||^2 / c_out^2``: the loss is the data-space squared error of
each stage weighted by :func:`loss_weights` ``= 1 / c_out(t_s)^2 = D(t_s) / sigma^2``.

Inactive (not yet started) stages have ``t = 0`` and a zeroed input, so ``xc = 0`` and their
network input stays zero, as the paper's input masking requires.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax import decompose
from dfm_jax.flow import per_sample


def coefficients(
  t: jax.Array, mean: jax.Array, std: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The preconditioning coefficients ``(c_in, c_skip, c_out)``, float32.

  ``t``, ``mean`` and ``std`` broadcast together (typically ``t [B, S]`` with ``mean, std [S]``,
  or ``t [B]`` with scalars); the results have the broadcast shape. ``mean`` is unused by the
  coefficients themselves (it enters through the centring ``xc = x_t - t * mean``) but is
  accepted so that every helper takes the same arguments.
  """
  del mean
  t = jnp.asarray(t, jnp.float32)
  var = jnp.square(jnp.asarray(std, jnp.float32))
  d = jnp.square(t) * var + jnp.square(1.0 - t)
  c_in = jax.lax.rsqrt(d)
  c_skip = (t * var - (1.0 - t)) / d
  c_out = jnp.sqrt(var) * c_in
  return c_in, c_skip, c_out


def loss_weights(t: jax.Array, std: jax.Array) -> jax.Array:
  """``1 / c_out(t)^2 = D(t) / sigma^2``: ``t [B, S]``, ``std [S]`` -> ``[B, S]`` float32."""
  var = jnp.square(jnp.asarray(std, jnp.float32))
  t = jnp.asarray(t, jnp.float32)
  return (jnp.square(t) * var + jnp.square(1.0 - t)) / var


def network_inputs(
  stages: Sequence[jax.Array], t: jax.Array, mean: jax.Array, std: jax.Array
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """Centres and scales the noisy stages.

  Args:
    stages: S noisy stages ``x_t [B, ...]``.
    t: ``[B, S]`` timesteps.
    mean, std: ``[S]`` per-stage data statistics.
  Returns:
    (centred ``xc = x_t - t m``, network inputs ``c_in * xc``), each S float32 arrays.
  """
  mean = jnp.asarray(mean, jnp.float32)
  c_in, _, _ = coefficients(t, mean, std)
  centred, inputs = [], []
  for s, x in enumerate(stages):
    x = x.astype(jnp.float32)
    xc = x - per_sample(t[:, s], x) * mean[s]
    centred.append(xc)
    inputs.append(per_sample(c_in[:, s], x) * xc)
  return tuple(centred), tuple(inputs)


def data_velocities(
  raw: Sequence[jax.Array],
  centred: Sequence[jax.Array],
  t: jax.Array,
  mean: jax.Array,
  std: jax.Array,
) -> tuple[jax.Array, ...]:
  """``v_pred = m + c_skip * xc + c_out * F`` per stage.

  Args:
    raw: S network outputs ``F [B, ...]``.
    centred: S centred inputs ``xc [B, ...]`` from :func:`network_inputs`.
    t: ``[B, S]``; mean, std: ``[S]``.
  Returns:
    S float32 data-space velocities.
  """
  mean = jnp.asarray(mean, jnp.float32)
  _, c_skip, c_out = coefficients(t, mean, std)
  out = []
  for s, (f, xc) in enumerate(zip(raw, centred)):
    out.append(
      mean[s]
      + per_sample(c_skip[:, s], xc) * xc
      + per_sample(c_out[:, s], xc) * f.astype(jnp.float32)
    )
  return tuple(out)


def stats_for_model(decomposition: decompose.Decomposition, batches) -> decompose.StageStats:
  """Per-stage mean and std of the stages the model sees (``decomposition.split`` output).

  ``decompose.estimate_stats`` measures the raw stages; if ``decomposition`` standardises
  (``decomposition.stats`` set), the raw statistics are mapped through that standardisation.

  Args:
    decomposition: the run's decomposition, with or without standardisation.
    batches: an iterable of data batches ``[B, (T,) H, W, C]`` (e.g. a few training batches).
  """
  raw = decompose.estimate_stats(decomposition.with_stats(None), batches)
  mean, std = np.asarray(raw.mean), np.asarray(raw.std)
  if decomposition.stats is not None:
    m0, s0 = np.asarray(decomposition.stats.mean), np.asarray(decomposition.stats.std)
    mean, std = (mean - m0) / s0, std / s0
  return decompose.StageStats(tuple(mean.tolist()), tuple(std.tolist()))


def set_stats(target, stats: decompose.StageStats) -> None:
  """Stores ``stats`` in a model, or in a train state's ``model``, ``ema`` and ``snapshot`` (those
  present)."""
  names = ("model", "ema", "snapshot")
  models = [getattr(target, name) for name in names if hasattr(target, name)]
  for m in models or [target]:
    m.set_data_stats(stats.mean, stats.std)


def estimate_and_set(
  target, decomposition: decompose.Decomposition, batches
) -> decompose.StageStats:
  """Estimates the per-stage statistics from data and stores them in the model(s).

  Call once at initialisation (not when restoring: the statistics are part of the checkpoint):
  ``precondition.estimate_and_set(state, exp.decomposition, batches)`` with ``state`` a
  ``TrainState`` (its ``model`` and ``ema`` both get the statistics) or a ``DFMDiT``, and
  ``batches`` an iterable of ``[B, H, W, C]`` images (``decomposition.stats_batches`` of them).
  Returns the statistics stored.
  """
  stats = stats_for_model(decomposition, batches)
  set_stats(target, stats)
  return stats
