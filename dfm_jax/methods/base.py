"""The method interface: what training and sampling need from an objective.

A method owns its training loss (``loss``) and its sampler (``sample``) for the project's
shared model, data, sharding, checkpointing and evaluation. Register a new one with
``@METHODS.register("name")`` and select it with ``--config.method=name``.

Time convention: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

import abc
from typing import Any

import jax

from dfm_jax.registry import Registry

METHODS: Registry = Registry("method")


class Method(abc.ABC):
  """A training objective and its sampler, bound to a run's ``experiment.Experiment`` (its
  decomposition, model config, ``flow`` settings and, from :meth:`options`, the method's own)."""

  def __init__(self, exp):
    self.exp = exp

  @classmethod
  def check_config(cls, config) -> list[str]:
    """Problems with ``config`` for this method (empty when it fits)."""
    del config
    return []

  @classmethod
  def options(cls, config) -> Any:
    """The method's own settings from ``config`` (once ``check_config`` passed), kept in
    ``Experiment.method_options``; None when it has none."""
    del config
    return None

  @classmethod
  def model_options(cls, config) -> dict[str, Any]:
    """``DiTConfig`` fields the method sets (e.g. ``cond_image``)."""
    del config
    return {}

  # A method that keeps a snapshot (the cascade's fixed low-resolution model) defines
  # ``snapshot_follows(step) -> bool scalar``: the train state then carries ``snapshot``, a copy
  # of the EMA model that the step refreshes after each update while it holds (``step``: the
  # step being taken, int32, may be traced). Saved with the checkpoint, never trained or averaged.
  snapshot_follows = None

  def sampling_state(self, state):
    """What ``sample`` takes as its model, from a train state (``nnx.State``, also an abstract
    one): a model's state or a tuple of them, each merged with the model's graphdef by
    ``sampling.make_sample_fn``. Default: the EMA weights ``state['ema']``."""
    return state["ema"]

  def data_stats(self, batches):
    """Per-stage mean and std (``decompose.StageStats``) of what the model is fed, from data
    batches ``[B, (T,) H, W, C]``; used for preconditioning. Default: the decomposition's
    stages."""
    from dfm_jax import precondition  # pylint: disable=g-import-not-at-top

    return precondition.stats_for_model(self.exp.decomposition, batches)

  @abc.abstractmethod
  def loss(
    self,
    model,
    key: jax.Array,
    data: jax.Array,
    labels: jax.Array,
    step: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """One Monte-Carlo estimate of the training loss (label dropout, stage weights and the
    timestep distribution: ``self.exp.flow``).

    Args:
      model: the network (e.g. ``dit.DFMDiT``).
      key: PRNG key for timesteps, noise and label dropout.
      data: a clean batch ``[B, H, W, C]`` (or ``[B, T, H, W, C]``) in the data space.
      labels: int ``[B]``.
      step: the optimizer step being taken (int32 scalar, may be traced), for objectives that
        change during training; the metrics must have the same keys at every step.
    Returns:
      (scalar loss, metrics dict of scalars).
    """

  @abc.abstractmethod
  def sample(
    self,
    model,
    key: jax.Array,
    labels: jax.Array,
    sampler_cfg,
    previews: bool = False,
  ) -> dict[str, Any]:
    """Samples from noise to data with ``sampler_cfg`` (``sampler.SamplerConfig``); traceable
    (the caller jits it). ``model``: what
    ``sampling_state`` picks, merged into models (by default the EMA model).

    Returns a dict with ``images`` ``[B, H, W, C]`` in the data space, ``nfe`` (int32 model
    passes) and, with ``previews``, ``previews`` ``[S, B, H, W, C]`` (coarse to fine).
    """
