"""The cascade baseline (paper appendix B): a low-resolution flow-matching model, then a
full-resolution one initialised from it and conditioned on the upsampled low-resolution image.

Time convention: ``x_t = t x1 + (1 - t) x0``, t = 0 noise, t = 1 data, target ``x1 - x0``.

Resolutions: the config's 2-stage pyramid (``laplacian`` or ``dct``) fixes them: the low one is
its coarse stage ``down(X)`` (a whole image), the high one is ``X`` itself. The network is the
2-stage DFM DiT (per-resolution patchify, time embedder and head, equal token grids) with
``cond_image`` on.

Two models of that network: the trained parameters (and their EMA) are the low-resolution model
until the switch and the full-resolution model after it, which so starts from everything the
low-resolution one learned (backbone, label and stage-index embeddings) with its own layers new.
The low-resolution model is the train state's ``snapshot``: a copy of the EMA weights that follows
the EMA until the switch and is fixed from then on (saved with the checkpoint, not trained, not
averaged), so training the full-resolution model does not change the low-resolution one.

Training, one run and one step counter; the phase follows from the step alone, so a checkpoint
at any step (also at the switch) resumes exactly, and the optimizer state carries on:

- steps ``[0, switch)``, ``switch = round(low_res_fraction * total_steps)``: flow matching on
  ``down(X)`` with ``t ~ logit-normal(flow.main_loc, flow.main_scale)``, fed as stage 1 with
  stage 2 masked (input zeroed, t = 0), as DFM does for a stage not yet started;
- steps ``[switch, total_steps)``: flow matching on ``X`` as stage 2 (stage 1's slot masked),
  conditioned through the conditioning tokens on ``cond = t_c up(down(X)) + (1 - t_c) eps``
  with fresh noise ``eps`` and ``t_c ~ logit-normal(cond_loc, cond_scale)``.

The conditioning's noise level is ``1 - t_c``: the paper's training distribution
logit-normal(1.5, 1) is read, as DFM's earlier-stage times are, in t (mostly clean, median
``t_c = 0.82``), and its inference level 0.025 as ``t_c = 0.975``.

Sampling: ``steps_per_stage[0]`` steps of the low-resolution model (the snapshot), bilinear
upsampling, the conditioning noised to ``t_c = 1 - sample_noise``, ``steps_per_stage[1]`` steps of
the full-resolution model (the EMA weights); each with its stage's guidance scale and interval
(``thresholds`` unused). Before the switch both are the same weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dfm_jax import flow, sampler as sampler_lib
from dfm_jax.decompose.base import split_stats
from dfm_jax.methods.base import METHODS, Method

PYRAMIDS = ("laplacian", "dct")


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
  """``switch_step``: the first step that trains the full-resolution model."""

  switch_step: int
  cond_loc: float = 1.5
  cond_scale: float = 1.0
  sample_noise: float = 0.025  # conditioning noise level 1 - t_c when sampling


def switch_step(low_res_fraction: float, total_steps: int) -> int:
  return int(round(float(low_res_fraction) * int(total_steps)))


def phase(step, switch: int):
  """The model a training step trains: 0 low resolution, 1 full resolution (int32)."""
  return (jnp.asarray(step) >= switch).astype(jnp.int32)


@METHODS.register("cascade")
class Cascade(Method):
  """A low-resolution model, then a full-resolution model conditioned on it."""

  @classmethod
  def check_config(cls, config) -> list[str]:
    d = config.decomposition
    problems = []
    if int(d.num_stages) != 2:
      problems.append(
        f"method 'cascade' has two resolutions, but decomposition.num_stages is "
        f"{d.num_stages} (use the config's ':cascade' twin)"
      )
    if d.kind not in PYRAMIDS:
      problems.append(
        f"method 'cascade' takes its low resolution from a pyramid: decomposition.kind must be "
        f"one of {', '.join(PYRAMIDS)}, got {d.kind!r}"
      )
    if d.standardize:
      problems.append(
        "method 'cascade' models whole images, not decomposition stages: set "
        "decomposition.standardize=False (model.precondition scales each resolution)"
      )
    for field in ("final_stage_probs", "stage_weights"):
      if config.flow.get(field) is not None:
        problems.append(
          f"method 'cascade' trains one model at a time (cascade.low_res_fraction), so "
          f"flow.{field} would be ignored: set flow.{field}=None"
        )
    c = config.cascade
    frac, total = c.low_res_fraction, int(config.total_steps)  # ranges: config_schema
    if not 0 < switch_step(frac, total) < total:
      problems.append(
        f"cascade.low_res_fraction {frac} of total_steps {total} leaves no step for one of "
        f"the two models"
      )
    return problems

  @classmethod
  def options(cls, config) -> CascadeConfig:
    c = config.cascade
    return CascadeConfig(
      switch_step=switch_step(c.low_res_fraction, config.total_steps),
      cond_loc=float(c.cond_loc),
      cond_scale=float(c.cond_scale),
      sample_noise=float(c.sample_noise),
    )

  @classmethod
  def model_options(cls, config) -> dict:
    del config
    return {"cond_image": True}

  def snapshot_follows(self, step: jax.Array) -> jax.Array:
    """The snapshot (the low-resolution model) takes the EMA after every low-resolution step,
    then stays as it is."""
    return phase(step, self.exp.method_options.switch_step) == 0

  def sampling_state(self, state):
    """``(low-resolution model, full-resolution model)``: the snapshot and the EMA weights."""
    return state["snapshot"], state["ema"]

  def resolutions(self, data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``data [B, (T,) H, W, C]`` -> ``(down(data), data)``: the two models' samples."""
    return self.exp.decomposition.with_stats(None).split(data)[0], data

  def upsample(self, low: jax.Array) -> jax.Array:
    """A low-resolution sample ``[B, *stage_shapes[0]]`` at full size ``[B, *stage_shapes[1]]``."""
    zeros = jnp.zeros(low.shape[:1] + self.exp.model.stage_shapes[1], low.dtype)
    return self.exp.decomposition.with_stats(None).preview((low, zeros), 1)

  def data_stats(self, batches):
    return split_stats(jax.jit(self.resolutions), 2, batches)

  def loss(self, model, key, data, labels, step=None):
    if step is None:
      raise ValueError("the cascade trains one model, then the other: pass the training step")
    exp, opts = self.exp, self.exp.method_options
    low, full = self.resolutions(data)
    b = data.shape[0]
    k_t, k_noise, k_ct, k_cond, k_drop = jax.random.split(key, 5)
    t = flow.logit_normal(k_t, (b,), exp.flow.main_loc, exp.flow.main_scale)
    zeros_t = jnp.zeros_like(t)
    labels = flow.drop_labels(k_drop, labels, exp.flow.label_dropout, exp.null_label)

    def fm_loss(x1, stage, **cond):
      x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
      xt = flow.per_sample(t, x1) * x1 + (1.0 - flow.per_sample(t, x1)) * x0
      inputs = (xt, jnp.zeros_like(full)) if stage == 0 else (jnp.zeros_like(low), xt)
      times = jnp.stack([t, zeros_t] if stage == 0 else [zeros_t, t], axis=1)
      pred = model(inputs, times, labels, jnp.full((b,), stage, jnp.int32), **cond)[stage]
      err = jnp.square(pred.astype(jnp.float32) - (x1 - x0).astype(jnp.float32))
      mse = err.mean(axis=tuple(range(1, err.ndim)))
      return jnp.mean(model.loss_weights(times)[:, stage] * mse), jnp.mean(mse)

    def low_res():
      return fm_loss(low, 0)

    def full_res():
      t_c = flow.logit_normal(k_ct, (b,), opts.cond_loc, opts.cond_scale)
      return fm_loss(full, 1, cond=noised(k_cond, self.upsample(low), t_c), cond_t=t_c)

    p = phase(step, opts.switch_step)
    loss, mse = jax.lax.cond(p == 1, full_res, low_res)
    return loss, {"loss": loss, "mse": mse, "cascade_phase": (p + 1).astype(jnp.float32)}

  def sample(self, model, key, labels, sampler_cfg, previews=False):
    """``model``: the pair ``(low-resolution model, full-resolution model)``
    (``sampling_state``)."""
    exp, opts = self.exp, self.exp.method_options
    if not isinstance(model, (tuple, list)) or len(model) != 2:
      raise TypeError(
        "the cascade samples with two models: pass (low-resolution model, full-resolution "
        f"model), as Cascade.sampling_state picks them; got {type(model).__name__}"
      )
    low_model, full_model = model
    if sampler_cfg.num_stages != 2:
      raise ValueError(f"the cascade samples in 2 phases, got {sampler_cfg.steps_per_stage}")
    low_shape, full_shape = exp.model.stage_shapes
    b = labels.shape[0]
    k_low, k_full, k_cond = jax.random.split(key, 3)

    def phase_cfg(s):
      return sampler_lib.SamplerConfig(
        (sampler_cfg.steps_per_stage[s],),
        (),
        solver=sampler_cfg.solver,
        cfg_scale=sampler_cfg.stage_cfg_scales[s],
        guidance_interval=sampler_cfg.stage_guidance_intervals[s],
        heun_final_euler=sampler_cfg.heun_final_euler,
      )

    def low_velocity(inputs, t, labels, stage_index):
      (x,) = inputs
      zeros = jnp.zeros(x.shape[:1] + full_shape, x.dtype)
      times = jnp.concatenate([t, jnp.zeros_like(t)], axis=1)
      return (low_model((x, zeros), times, labels, stage_index)[0],)

    noise = jax.random.normal(k_low, (b,) + low_shape, jnp.float32)
    first = sampler_lib.sample(
      low_velocity, (noise,), labels, phase_cfg(0), null_label=exp.null_label
    )
    up = self.upsample(first["stages"][0])
    t_c = 1.0 - opts.sample_noise
    cond = noised(k_cond, up, jnp.full((b,), t_c, jnp.float32))

    def full_velocity(inputs, t, labels, stage_index):
      (x,) = inputs
      n = x.shape[0]  # 2 B when the sampler doubles the batch for guidance
      c = jnp.concatenate([cond] * (n // b))
      zeros = jnp.zeros((n,) + low_shape, x.dtype)
      times = jnp.concatenate([jnp.zeros_like(t), t], axis=1)
      cond_t = jnp.full((n,), t_c, jnp.float32)
      out = full_model((zeros, x), times, labels, stage_index + 1, cond=c, cond_t=cond_t)
      return (out[1],)

    noise = jax.random.normal(k_full, (b,) + full_shape, jnp.float32)
    second = sampler_lib.sample(
      full_velocity, (noise,), labels, phase_cfg(1), null_label=exp.null_label
    )
    images = second["stages"][0]
    out = {"images": images, "nfe": first["nfe"] + second["nfe"]}
    if previews:
      out["previews"] = jnp.stack([up, images])
    return out


def noised(key: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
  """``t x1 + (1 - t) eps`` with fresh ``eps ~ N(0, I)``: ``x1 [B, ...]``, ``t [B]``."""
  eps = jax.random.normal(key, x1.shape, x1.dtype)
  return flow.per_sample(t, x1) * x1 + (1.0 - flow.per_sample(t, x1)) * eps
