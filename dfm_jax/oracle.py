"""The oracle: the exact optimal velocity of a finite data set, no network.

Time convention: ``x_t = t * x1 + (1 - t) * x0`` with ``x0 ~ N(0, I)``; t = 0 is noise, t = 1 is
data. For a data set of N points whose stages are ``Y_s^i`` and per-stage times ``t_s``, the
posterior over the points given the noisy stages ``x_s`` is

  ``p(i | x) ~ prior_i * exp(-sum_s ||x_s - t_s Y_s^i||^2 / (2 (1 - t_s)^2))``

(a stage at t = 0 carries no information; the sampler zeroes its input as training does), and
the velocity that minimises the DFM loss is, per stage,

  ``v_s(x, t) = E[X_s - eps_s | x] = (E[Y_s | x] - x_s) / (1 - t_s)``.

Driving the project's own sampler (``sampler.sample``) and decomposition with it isolates what
the sampler settings cost (the step allocation, thresholds, timestep schedule and band
standardisation) from what a network would learn: the exact ODE of a finite set ends on a data
point, so every loss of band variance, every distance to the nearest data point and every FID
against the data set itself is discretisation error. ``bench/oracle.py`` reports these for any
config; :mod:`dfm_jax.stage_schedule` picks stage schedules that the oracle then checks.

Class-conditional: a label restricts the posterior to that class's points; ``null_label`` (the
unconditional branch of guidance) uses every point.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax import sampler as sampler_lib
from dfm_jax.decompose import Decomposition
from dfm_jax.flow import VelocityFn

# 1 - t is floored here: a finished stage (t = 1) then pins the posterior to the points nearest
# it instead of dividing by zero (its velocity is never used: it no longer moves).
MIN_SIGMA = 1e-4


def optimal_velocity_fn(
  data_stages: Sequence[jax.Array],
  data_labels: jax.Array | None = None,
  *,
  null_label: int = -1,
  min_sigma: float = MIN_SIGMA,
) -> VelocityFn:
  """The exact optimal velocity of the data set ``data_stages`` (uniform prior over points).

  Args:
    data_stages: S arrays ``Y_s [N, ...]``, the data set's stages as the model sees them
      (``decomposition.split`` of the data, standardised if the decomposition is).
    data_labels: optional int ``[N]``; with them a label other than ``null_label`` restricts the
      posterior to its class.
    null_label: the label meaning "no class".
    min_sigma: floor of ``1 - t``.
  Returns:
    ``velocity_fn(inputs, t [B, S], labels [B], stage_index [B]) -> S velocities`` (the
    ``flow.VelocityFn`` contract), float32.
  """
  flat = [jnp.asarray(y, jnp.float32).reshape(y.shape[0], -1) for y in data_stages]
  sq_norms = [jnp.sum(jnp.square(y), axis=1) for y in flat]  # [N] each
  labels_data = None if data_labels is None else jnp.asarray(data_labels, jnp.int32)

  def velocity_fn(inputs, t, labels, stage_index):
    del stage_index
    batch = inputs[0].shape[0]
    t = t.astype(jnp.float32)
    sigma = jnp.maximum(1.0 - t, min_sigma)  # [B, S]
    logits = jnp.zeros((batch, flat[0].shape[0]), jnp.float32)
    xs = []
    for s, (x, y, yy) in enumerate(zip(inputs, flat, sq_norms)):
      x = x.astype(jnp.float32).reshape(batch, -1)
      xs.append(x)
      ts, inv_var = t[:, s : s + 1], 1.0 / jnp.square(sigma[:, s : s + 1])
      # -||x - t y||^2 / (2 sigma^2) without the ||x||^2 term, equal for every point
      logits = logits + inv_var * (ts * (x @ y.T) - 0.5 * jnp.square(ts) * yy[None, :])
    if labels_data is not None:
      conditional = labels[:, None] != null_label
      same_class = labels_data[None, :] == labels[:, None]
      logits = jnp.where(conditional & ~same_class, -jnp.inf, logits)
    weights = jax.nn.softmax(logits, axis=1)  # [B, N]
    out = []
    for s, (x, y) in enumerate(zip(xs, flat)):
      mean = weights @ y
      out.append(((mean - x) / sigma[:, s : s + 1]).reshape(inputs[s].shape))
    return tuple(out)

  return velocity_fn


@dataclasses.dataclass(frozen=True)
class OracleResult:
  """What :func:`sample` returns: ``images [B, ...]`` in the data space, the generated
  ``stages`` (S arrays as the model sees them) and the labels used."""

  images: np.ndarray
  stages: tuple[np.ndarray, ...]
  labels: np.ndarray


def sample(
  decomposition: Decomposition,
  data: np.ndarray,
  data_labels: np.ndarray | None,
  sampler_cfg: sampler_lib.SamplerConfig,
  labels: np.ndarray,
  *,
  null_label: int,
  seed: int = 0,
  batch_size: int = 250,
) -> OracleResult:
  """Samples with the project's sampler driven by the data set's optimal velocity.

  Args:
    decomposition: the run's decomposition (with its standardisation, if any).
    data: the data set ``[N, H, W, C]`` (or ``[N, T, H, W, C]``) in the data space.
    data_labels: int ``[N]`` or None (unconditional).
    sampler_cfg: steps per stage, thresholds, solver, guidance.
    labels: int ``[B]`` labels to sample (``null_label`` for unconditional samples).
    null_label: the label meaning "no class".
    seed: noise seed.
    batch_size: samples per sampler call.
  """
  data = jnp.asarray(data, jnp.float32)
  data_stages = jax.jit(decomposition.split)(data)
  velocity_fn = optimal_velocity_fn(data_stages, data_labels, null_label=null_label)
  stage_shapes = [tuple(y.shape[1:]) for y in data_stages]

  @jax.jit
  def run(key, batch_labels):
    keys = jax.random.split(key, len(stage_shapes))
    noise = tuple(
      jax.random.normal(k, (batch_labels.shape[0],) + shape, jnp.float32)
      for k, shape in zip(keys, stage_shapes)
    )
    out = sampler_lib.sample(
      velocity_fn, noise, batch_labels, sampler_cfg, null_label=null_label,
      decomposition=decomposition,
    )  # fmt: skip
    return out["images"], out["stages"]

  labels = np.asarray(labels, np.int32)
  images, stages = [], []
  key = jax.random.key(seed)
  for start in range(0, len(labels), batch_size):
    chunk = labels[start : start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1], np.int32)])
    img, st = run(jax.random.fold_in(key, start), jnp.asarray(padded))
    images.append(np.asarray(img)[: len(chunk)])
    stages.append([np.asarray(s)[: len(chunk)] for s in st])
  return OracleResult(
    images=np.concatenate(images),
    stages=tuple(np.concatenate([b[s] for b in stages]) for s in range(len(stage_shapes))),
    labels=labels,
  )


def band_variance_kept(
  decomposition: Decomposition, generated: np.ndarray, real: np.ndarray
) -> tuple[float, ...]:
  """Per band (coarse to fine) of the unstandardised decomposition: the variance across
  samples of the generated band over that of the real band (1 = every band's spread kept),
  each the mean over the band's elements of the per-element variance.

  ``generated [B, ...]`` and ``real [N, ...]`` are images in the data space.
  """
  split = jax.jit(decomposition.with_stats(None).split)
  gen, ref = split(jnp.asarray(generated, jnp.float32)), split(jnp.asarray(real, jnp.float32))
  return tuple(
    float(np.mean(np.var(np.asarray(g), axis=0)) / np.mean(np.var(np.asarray(r), axis=0)))
    for g, r in zip(gen, ref)
  )


def nearest_distance(generated: np.ndarray, real: np.ndarray, chunk: int = 500) -> np.ndarray:
  """``[B]``: the root-mean-square distance per element from each generated image to its
  nearest image of ``real [N, ...]`` (0 when a sample is a data point)."""
  g = np.asarray(generated, np.float32).reshape(len(generated), -1)
  r = jnp.asarray(np.asarray(real, np.float32).reshape(len(real), -1))
  rr = jnp.sum(jnp.square(r), axis=1)
  out = []
  for start in range(0, len(g), chunk):
    x = jnp.asarray(g[start : start + chunk])
    d2 = jnp.sum(jnp.square(x), axis=1)[:, None] - 2.0 * x @ r.T + rr[None, :]
    out.append(np.sqrt(np.maximum(np.asarray(d2.min(axis=1)), 0.0) / g.shape[1]))
  return np.concatenate(out)
