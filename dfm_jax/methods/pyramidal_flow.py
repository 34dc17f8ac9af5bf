"""Pyramidal Flow (Jin et al. 2024, arXiv 2410.05954), the paper's single-model baseline.

One flow cut into K equal time windows; window k runs at pyramid level k (level 0 coarsest,
each finer level twice the spatial size; every level is the whole sample, a Gaussian pyramid of
bilinear x0.5 downsamples). Pyramidal Flow writes ``x = sigma n + (1 - sigma) data``; here
t = 1 - sigma, so t = 0 is noise and t = 1 data, and window k spans global t from about k/K to
(k+1)/K (:func:`window_times`).

- Noise is shared across levels: ``n_{K-1} ~ N(0, I)``, ``n_{k-1} = 2 down(n_k)`` (unit variance).
- Window k starts at sigma ``S_k`` (corrected for the jump) and ends at ``E_k = 1 - (k+1)/K``:
  ``start = S_k n_k + (1 - S_k) up(clean_{k-1})`` (``n_0`` for k = 0, ``up`` nearest x2),
  ``end = E_k n_k + (1 - E_k) clean_k``; with ``r ~ U[0, 1)``, ``x = r start + (1 - r) end``.
  The model sees x at level k (other levels zero), its global time (``r`` of the way back from
  the window's end to its start) and stage index k, and regresses ``end - start`` (the velocity
  in the window's own time ``u = 1 - r``, from 0 at the start to 1 at the end).
- Sampling: Euler inside each window; at a jump, ``x <- alpha up(x) + beta eps`` with block
  noise eps (covariance ``(1 + gamma) I - gamma 11^T`` inside each 2x2 block), which gives
  exactly the next window's training start point in distribution.

Arrays: images ``[B, H, W, C]``, videos ``[B, T, H, W, C]`` (only space is halved).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax import flow
from dfm_jax.decompose.pyramid import Laplacian
from dfm_jax.methods.base import METHODS, Method

GAMMA = 1.0 / 3.0  # block-noise correlation of Pyramidal Flow


TRAIN_GRID = 1000  # Pyramid-Flow places the window bounds on its 1000-step training grid


def window_sigmas(num_windows: int, gamma: float = GAMMA) -> tuple[np.ndarray, np.ndarray]:
  """Start and end sigmas ``(S [K], E [K])`` (sigma = 1 - t) of the K windows.

  ``E_k = 1 - (k + 1) / K`` on the 1000-step grid (``1 - floor(1000 (k + 1) / K) / 1000``, so
  (0.667, 0.334, 0) for K = 3); ``S_0 = 1`` and ``S_k = 1 - s / (sqrt(1 + 1/gamma) (1 - s) + s)``
  with ``s = 1 - E_{k-1}``: the noise level a jump from ``E_{k-1}`` lands on.
  """
  k = np.arange(num_windows)
  end = 1.0 - ((k + 1) * TRAIN_GRID // num_windows) / TRAIN_GRID
  end[-1] = 0.0
  start = np.ones(num_windows)
  for i in range(1, num_windows):
    start[i] = 1.0 - jump_coefficients_from(end[i - 1], gamma)[0] * (1.0 - end[i - 1])
  return start, end


def window_times(num_windows: int) -> np.ndarray:
  """Global t at the window bounds, ``[K + 1]``: ``0, 1 - E_0, ..., 1 - E_{K-1} = 1``; window
  k covers ``[bounds[k], bounds[k + 1]]`` and the model is told ``t`` linear in between."""
  _, end = window_sigmas(num_windows)
  return np.concatenate([[0.0], 1.0 - end])


def jump_coefficients_from(end_sigma: float, gamma: float = GAMMA) -> tuple[float, float]:
  """``(alpha, beta)`` of the jump after a window ending at sigma ``end_sigma``:
  ``alpha = 1 / (sqrt(1 + 1/gamma) (1 - s) + s)``, ``beta = alpha (1 - s) / sqrt(gamma)``,
  ``s = 1 - end_sigma``."""
  s = 1.0 - float(end_sigma)
  alpha = 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - s) + s)
  return alpha, alpha * (1.0 - s) / math.sqrt(gamma)


def jump_coefficients(num_windows: int, gamma: float = GAMMA) -> list[tuple[float, float]]:
  """``(alpha, beta)`` of the K - 1 jumps, in order."""
  _, end = window_sigmas(num_windows, gamma)
  return [jump_coefficients_from(e, gamma) for e in end[:-1]]


def spatial_axes(ndim: int) -> tuple[int, int]:
  """The (H, W) axes of an image (rank 4) or video (rank 5) batch."""
  if ndim not in (4, 5):
    raise ValueError(f"expected [B, H, W, C] or [B, T, H, W, C], got rank {ndim}")
  return (ndim - 3, ndim - 2)


def down(x: jax.Array) -> jax.Array:
  """Bilinear x0.5 (no antialiasing: the mean of each 2x2 block) over the spatial axes."""
  for a in spatial_axes(x.ndim):
    x = Laplacian.down(x, a)
  return x


def nearest_up(x: jax.Array) -> jax.Array:
  """Nearest x2 over the spatial axes."""
  for a in spatial_axes(x.ndim):
    x = jnp.repeat(x, 2, axis=a)
  return x


def bilinear_up(x: jax.Array, times: int) -> jax.Array:
  """Bilinear x2, ``times`` times, over the spatial axes (for previews)."""
  for _ in range(times):
    for a in spatial_axes(x.ndim):
      x = Laplacian.up(x, a)
  return x


def gaussian_pyramid(x: jax.Array, num_levels: int) -> tuple[jax.Array, ...]:
  """``x`` at every level, coarse to fine (the last is ``x`` itself)."""
  levels = [x]
  for _ in range(num_levels - 1):
    levels.append(down(levels[-1]))
  return tuple(levels[::-1])


def shared_noise(key: jax.Array, shape, num_levels: int, dtype=jnp.float32) -> tuple:
  """Unit-variance noise at every level, coarse to fine: full-size ``N(0, I)`` of ``shape``,
  each lower level twice the x0.5 downsample of the one above."""
  levels = [jax.random.normal(key, shape, dtype)]
  for _ in range(num_levels - 1):
    levels.append(2.0 * down(levels[-1]))
  return tuple(levels[::-1])


def block_noise(key: jax.Array, shape, gamma: float = GAMMA, dtype=jnp.float32) -> jax.Array:
  """Gaussian noise of ``shape`` (even H and W), independent across 2x2 spatial blocks, with
  covariance ``(1 + gamma) I - gamma 11^T`` inside each block (needs 0 <= gamma <= 1/3)."""
  cov = (1.0 + gamma) * np.eye(4) - gamma * np.ones((4, 4))
  lam, vec = np.linalg.eigh(cov)
  root = jnp.asarray(vec @ np.diag(np.sqrt(np.clip(lam, 0.0, None))) @ vec.T, dtype)
  h, w = spatial_axes(len(shape))
  pre, post = tuple(shape[:h]), tuple(shape[w + 1 :])
  z = jax.random.normal(key, pre + (shape[h] // 2, shape[w] // 2) + post + (4,), dtype)
  eps = (z @ root).reshape(z.shape[:-1] + (2, 2))  # [..., H/2, W/2, *post, 2, 2]
  n = len(pre)
  eps = jnp.moveaxis(eps, (-2, -1), (n + 1, n + 3))  # [..., H/2, 2, W/2, 2, *post]
  return eps.reshape(tuple(shape))


def window_points(
  clean: tuple, noise: tuple, k: int, start_sigma: float, end_sigma: float
) -> tuple[jax.Array, jax.Array]:
  """Training start and end points of window k at level k.

  Args:
    clean: the clean pyramid, coarse to fine (:func:`gaussian_pyramid`).
    noise: the shared noise pyramid (:func:`shared_noise`).
  Returns:
    ``(start, end)``, each like ``clean[k]``.
  """
  n = noise[k]
  start = n if k == 0 else start_sigma * n + (1.0 - start_sigma) * nearest_up(clean[k - 1])
  end = end_sigma * n + (1.0 - end_sigma) * clean[k]
  return start, end


@METHODS.register("pyramidal_flow")
class PyramidalFlow(Method):
  """Pyramidal Flow on ``exp.model.stage_shapes`` (one pyramid level per stage of the model)."""

  @classmethod
  def check_config(cls, config) -> list[str]:
    name = "method 'pyramidal_flow'"
    dec = config.decomposition
    k = int(dec.num_stages)
    problems = []
    if dec.kind != "laplacian":
      problems.append(
        f"{name} takes its pyramid levels' shapes from decomposition.kind 'laplacian', "
        f"got {dec.kind!r}"
      )
    if any(int(g) != 1 for g in dec.level_gaps):
      problems.append(
        f"{name} halves once between levels (its jumps upsample x2): decomposition.level_gaps "
        f"must be () or all 1, got {tuple(dec.level_gaps)}"
      )
    if dec.halve_time:
      problems.append(f"{name} halves space only: set decomposition.halve_time=False")
    if dec.standardize:
      problems.append(
        f"{name} carries each level into the next at every jump, so all levels share one scale: "
        "set decomposition.standardize=False"
      )
    if config.model.precondition:
      problems.append(
        f"{name} regresses window velocities, not the x_t = t x1 + (1 - t) x0 path that "
        "model.precondition scales for: set model.precondition=False"
      )
    if config.sampler.solver != "euler":
      problems.append(f"{name} samples with Euler steps: set sampler.solver='euler'")
    ends = tuple((i + 1) / k for i in range(k - 1))
    got = tuple(float(v) for v in config.sampler.thresholds)
    if len(got) != len(ends) or any(abs(a - b) > 2.0 / TRAIN_GRID for a, b in zip(got, ends)):
      problems.append(
        f"{name} cuts time into {k} equal windows: sampler.thresholds must be their ends "
        f"{tuple(round(v, 6) for v in ends)} in t, got {got}"
      )
    return problems

  @property
  def num_levels(self) -> int:
    return len(self.exp.model.stage_shapes)

  def _window(self, key, batch, step=None):
    """int32 ``[B]``: each sample's window, drawn from p_q at ``step`` (a
    ``flow.final_stage_probs`` schedule moves it as for DFM)."""
    cfg = self.exp.flow
    logits = jnp.log(flow.stage_probs_at(cfg, step))
    draws = batch if cfg.per_sample_stage else 1
    window = jax.random.categorical(key, logits, shape=(draws,)).astype(jnp.int32)
    return jnp.broadcast_to(window, (batch,))

  def loss(self, model, key, data, labels, step=None):
    """Plain MSE of the model's level-k output against ``end - start`` of each sample's window
    k (``data [B, (T,) H, W, C]`` at the finest level); metrics per window (1-based)."""
    num = self.num_levels
    batch = data.shape[0]
    k_win, k_r, k_noise, k_drop = jax.random.split(key, 4)
    window = self._window(k_win, batch, step)
    r = jax.random.uniform(k_r, (batch,), jnp.float32)
    clean = gaussian_pyramid(data.astype(jnp.float32), num)
    noise = shared_noise(k_noise, data.shape, num)
    start_s, end_s = window_sigmas(num)
    onehot = jax.nn.one_hot(window, num, dtype=jnp.float32)  # [B, K]
    inputs, targets = [], []
    for s in range(num):
      start, end = window_points(clean, noise, s, float(start_s[s]), float(end_s[s]))
      x = flow.per_sample(r, start) * start + flow.per_sample(1.0 - r, end) * end
      inputs.append(x * flow.per_sample(onehot[:, s], x))
      targets.append(end - start)
    bounds = jnp.asarray(window_times(num), jnp.float32)
    t_glob = r * bounds[window] + (1.0 - r) * bounds[window + 1]
    t = onehot * t_glob[:, None]
    labels = flow.drop_labels(k_drop, labels, self.exp.flow.label_dropout, self.exp.null_label)
    pred = model(tuple(inputs), t, labels, window)
    mse = jnp.stack(
      [
        jnp.mean(jnp.square(p.astype(jnp.float32) - y), axis=tuple(range(1, y.ndim)))
        for p, y in zip(pred, targets)
      ],
      axis=1,
    )  # [B, K]
    stage_weights = self.exp.flow.stage_weights
    weights = jnp.ones((num,)) if stage_weights is None else jnp.asarray(stage_weights)
    per_sample = jnp.sum(mse * onehot * weights[None, :], axis=1)
    loss = jnp.mean(per_sample)
    metrics = {"loss": loss}
    for s in range(num):
      count = onehot[:, s].sum()
      metrics[f"loss_stage{s + 1}"] = (per_sample * onehot[:, s]).sum() / jnp.maximum(count, 1.0)
      metrics[f"frac_main_stage{s + 1}"] = count / batch
    return loss, metrics

  def jump(self, key: jax.Array, x: jax.Array, k: int) -> jax.Array:
    """The state entering window ``k >= 1`` from the end state ``x`` of window k - 1."""
    alpha, beta = jump_coefficients(self.num_levels)[k - 1]
    up = nearest_up(x)
    return alpha * up + beta * block_noise(key, up.shape, dtype=up.dtype)

  def sample(self, model, key, labels, sampler_cfg, previews=False):
    """Windows coarse to fine, ``steps_per_stage[k]`` Euler steps each; guidance with window
    k's scale where the step's global t is inside window k's guidance interval.

    ``previews [K, B, H, W, C]``: after window k, ``end - E_k (start - end) / (S_k - E_k)``
    (the clean level if ``up(clean_{k-1}) = clean_k``; exact for the last window), bilinearly
    upsampled to full size.
    """
    num = self.num_levels
    shapes = self.exp.model.stage_shapes
    batch = labels.shape[0]
    null = jnp.full_like(labels, self.exp.null_label)
    start_s, end_s = window_sigmas(num)
    scales = sampler_cfg.stage_cfg_scales
    intervals = sampler_cfg.stage_guidance_intervals
    keys = jax.random.split(key, num)
    x = jax.random.normal(keys[0], (batch,) + tuple(shapes[0]), jnp.float32)
    nfe = jnp.int32(0)
    shots = []
    for k in range(num):
      if k:
        x = self.jump(keys[k], x, k)
      x_start = x
      steps = int(sampler_cfg.steps_per_stage[k])
      u = np.linspace(0.0, 1.0, steps + 1)
      t0, t1 = window_times(num)[k : k + 2]
      t_glob = t0 + u[:-1] * (t1 - t0)
      lo, hi = intervals[k]
      guided = (scales[k] != 1.0) & (t_glob >= lo) & (t_glob <= hi)
      step = self._euler_step(model, k, labels, null, float(scales[k]), bool(guided.any()))
      xs = (
        jnp.asarray(t_glob, jnp.float32),
        jnp.asarray(np.diff(u), jnp.float32),
        jnp.asarray(guided),
      )
      (x, nfe), _ = jax.lax.scan(step, (x, nfe), xs)
      if previews:
        if k == num - 1:
          est = x
        else:
          est = x - end_s[k] * (x_start - x) / (start_s[k] - end_s[k])
        shots.append(bilinear_up(est, num - 1 - k))
    out = {"images": x, "nfe": nfe}
    if previews:
      out["previews"] = jnp.stack(shots)
    return out

  def _euler_step(self, model, k, labels, null, scale, any_guided):
    num = self.num_levels
    shapes = self.exp.model.stage_shapes
    batch = labels.shape[0]

    def call(x, t, lab):
      b = x.shape[0]
      inputs = tuple(
        x if s == k else jnp.zeros((b,) + tuple(shape), x.dtype) for s, shape in enumerate(shapes)
      )
      tt = jnp.zeros((b, num), jnp.float32).at[:, k].set(t)
      return model(inputs, tt, lab, jnp.full((b,), k, jnp.int32))[k]

    def step(carry, xs):
      x, nfe = carry
      t, dt, g = xs

      def conditional():
        return call(x, t, labels), jnp.int32(1)

      def guided_pass():
        v = call(jnp.concatenate([x, x]), t, jnp.concatenate([labels, null]))
        v_c, v_u = v[:batch], v[batch:]
        return v_u + scale * (v_c - v_u), jnp.int32(2)

      v, n = jax.lax.cond(g, guided_pass, conditional) if any_guided else conditional()
      return (x + dt * v, nfe + n), None

    return step
