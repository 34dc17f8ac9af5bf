"""Decomposable Flow Matching: per-stage timesteps and noise, one model for all stage velocities
(``flow.dfm_training_loss``), sampled coarse to fine by the stage-scheduled sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dfm_jax import flow, sampler as sampler_lib
from dfm_jax.methods.base import METHODS, Method


def velocity_fn(model) -> flow.VelocityFn:
  """The model as ``(inputs, t [B, S], labels [B], stage_index [B]) -> S velocities``."""
  return lambda inputs, t, labels, stage_index: model(inputs, t, labels, stage_index)


@METHODS.register("dfm")
class DecomposableFlowMatching(Method):
  """The paper's method on ``exp.decomposition``'s stages."""

  def loss(self, model, key, data, labels, step=None):
    exp = self.exp
    stages = exp.decomposition.split(data)
    extra = {}
    if hasattr(model, "loss_weights"):
      extra["loss_weight_fn"] = model.loss_weights
    return flow.dfm_training_loss(
      velocity_fn(model),
      key,
      stages,
      labels,
      exp.flow,
      null_label=exp.null_label,
      step=step,
      **extra,
    )

  def sample(self, model, key, labels, sampler_cfg, previews=False):
    exp = self.exp
    keys = jax.random.split(key, exp.decomposition.num_stages)
    noise = tuple(
      jax.random.normal(k, (labels.shape[0],) + shape, jnp.float32)
      for k, shape in zip(keys, exp.model.stage_shapes)
    )
    return sampler_lib.sample(
      velocity_fn(model),
      noise,
      labels,
      sampler_cfg,
      null_label=exp.null_label,
      decomposition=exp.decomposition,
      previews=previews,
    )
