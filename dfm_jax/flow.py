"""The DFM training objective: per-stage timesteps, noising, velocity targets and the masked loss.

Time convention: ``x_t = t * x1 + (1 - t) * x0`` with ``x0 ~ N(0, I)``; t = 0 is noise, t = 1 is
data; the velocity target is ``v = x1 - x0``. Every stage s has its own ``t_s`` and noise.

Algorithm 1 of the paper, per sample (or once per batch): draw the main stage Q from ``p_q``;
``t_Q ~ logit-normal(main_loc, main_scale)``; earlier stages ``t_s ~ logit-normal(early_loc,
early_scale)``; later stages ``t_s = 0``, their inputs zeroed and their losses masked. With one
stage this is plain flow matching with logit-normal timesteps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """The flow objective's settings, the config's ``flow`` block (defaults: the paper's values):
  the training timestep distribution, label dropout and the stages' loss weights. Built once by
  :meth:`from_config` and passed whole to every method."""

  stage_probs: tuple[float, ...] = (1.0,)  # p_q over stages, coarse to fine
  # A p_q schedule: p_q moves linearly from stage_probs at step 0 to final_stage_probs at step
  # schedule_steps and stays there (None: p_q is constant).
  final_stage_probs: tuple[float, ...] | None = None
  schedule_steps: int = 0
  main_loc: float = 0.0
  main_scale: float = 1.0
  early_loc: float = 1.5  # the re-implementation uses 2.0
  early_scale: float = 1.0
  per_sample_stage: bool = True  # False: one Q per batch (the re-implementation)
  label_dropout: float = 0.1  # probability of the null label (classifier-free guidance)
  stage_weights: tuple[float, ...] | None = None  # constant [S] loss weights (None: all 1)

  @classmethod
  def from_config(cls, config) -> "FlowConfig":
    """From a run config's ``flow`` block; a p_q schedule spans ``total_steps``."""
    f = config.flow
    final, weights = f.final_stage_probs, f.stage_weights
    return cls(
      stage_probs=tuple(float(p) for p in f.stage_probs),
      final_stage_probs=tuple(float(p) for p in final) if final is not None else None,
      schedule_steps=int(config.total_steps) if final is not None else 0,
      main_loc=float(f.main_loc),
      main_scale=float(f.main_scale),
      early_loc=float(f.early_loc),
      early_scale=float(f.early_scale),
      per_sample_stage=bool(f.per_sample_stage),
      label_dropout=float(f.label_dropout),
      stage_weights=tuple(float(w) for w in weights) if weights is not None else None,
    )

  def __post_init__(self):
    validate_stage_probs(self.stage_probs)
    if self.stage_weights is not None and len(self.stage_weights) != len(self.stage_probs):
      raise ValueError(
        f"flow.stage_weights has {len(self.stage_weights)} entries for "
        f"{len(self.stage_probs)} stages"
      )
    if self.final_stage_probs is not None:
      validate_stage_probs(self.final_stage_probs, "final_stage_probs")
      if len(self.final_stage_probs) != len(self.stage_probs):
        raise ValueError(
          f"final_stage_probs has {len(self.final_stage_probs)} entries for "
          f"{len(self.stage_probs)} stages"
        )
      if self.schedule_steps < 1:
        raise ValueError(f"a p_q schedule needs schedule_steps >= 1, got {self.schedule_steps}")
    if self.main_scale <= 0 or self.early_scale <= 0:
      raise ValueError(
        "logit-normal scales must be > 0, got "
        f"main_scale={self.main_scale}, early_scale={self.early_scale}"
      )

  @property
  def num_stages(self) -> int:
    return len(self.stage_probs)


def validate_stage_probs(probs: Sequence[float], name: str = "stage_probs") -> None:
  p = np.asarray(probs, dtype=np.float64)
  if p.ndim != 1 or p.size == 0 or (p < 0).any() or abs(p.sum() - 1.0) > 1e-6:
    raise ValueError(
      f"{name} (p_q) must be a probability distribution over the stages "
      f"(non-negative, summing to 1), got {tuple(probs)}"
    )


def logit_normal(key: jax.Array, shape: Sequence[int], loc: float, scale: float) -> jax.Array:
  """Samples ``sigmoid(loc + scale * N(0, 1))`` in (0, 1), float32."""
  return jax.nn.sigmoid(loc + scale * jax.random.normal(key, shape, jnp.float32))


def stage_probs_at(cfg: FlowConfig, step: jax.Array | int | None = None) -> jax.Array:
  """float32 ``[S]``: p_q at training step ``step`` (``cfg.stage_probs`` when there is no
  schedule or no step; otherwise linear from ``stage_probs`` at step 0 to ``final_stage_probs``
  at ``schedule_steps``, constant after)."""
  start = jnp.asarray(cfg.stage_probs, jnp.float32)
  if cfg.final_stage_probs is None or step is None:
    return start
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.schedule_steps, 0.0, 1.0)
  return start + frac * (jnp.asarray(cfg.final_stage_probs, jnp.float32) - start)


def sample_stage_times(
  key: jax.Array, batch_size: int, cfg: FlowConfig, step: jax.Array | int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Draws the main stage and per-stage timesteps (p_q at training step ``step`` when
  ``cfg`` has a p_q schedule, see :func:`stage_probs_at`).

  Returns:
    main_stage: int32 ``[B]`` in ``0..S-1`` (0 = coarsest).
    t: float32 ``[B, S]``; ``t[b, s] = 0`` exactly for every stage after the main stage.
  """
  num_stages = cfg.num_stages
  k_stage, k_main, k_early = jax.random.split(key, 3)
  logits = jnp.log(stage_probs_at(cfg, step))
  draws = 1 if not cfg.per_sample_stage else batch_size
  main_stage = jax.random.categorical(k_stage, logits, shape=(draws,)).astype(jnp.int32)
  main_stage = jnp.broadcast_to(main_stage, (batch_size,))
  t_main = logit_normal(k_main, (batch_size, 1), cfg.main_loc, cfg.main_scale)
  t_early = logit_normal(k_early, (batch_size, num_stages), cfg.early_loc, cfg.early_scale)
  s = jnp.arange(num_stages)[None, :]
  q = main_stage[:, None]
  t = jnp.where(s < q, t_early, jnp.where(s == q, t_main, 0.0))
  return main_stage, t


def active_mask(main_stage: jax.Array, num_stages: int) -> jax.Array:
  """float32 ``[B, S]``: 1 for stages up to and including the main stage, else 0."""
  return (jnp.arange(num_stages)[None, :] <= main_stage[:, None]).astype(jnp.float32)


def per_sample(a: jax.Array, x: jax.Array) -> jax.Array:
  """``a`` (per-sample values ``[B]``, or ``[B, S]``...) reshaped to broadcast against ``x``
  (``[B, ...]``): trailing unit axes up to ``x.ndim``."""
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def noisy_inputs(
  stages: Sequence[jax.Array], noise: Sequence[jax.Array], t: jax.Array, active: jax.Array
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """Per-stage noising and velocity targets.

  Args:
    stages: S clean stages ``x1_s [B, ...]``.
    noise: S noise arrays ``x0_s`` of the same shapes.
    t: ``[B, S]`` timesteps.
    active: ``[B, S]`` mask; inactive stages get their model input zeroed.
  Returns:
    (inputs ``x_t`` with inactive stages zeroed, targets ``x1 - x0``), each a tuple of S arrays.
  """
  inputs, targets = [], []
  for s, (x1, x0) in enumerate(zip(stages, noise)):
    ts = per_sample(t[:, s], x1)
    xt = ts * x1 + (1.0 - ts) * x0
    inputs.append(xt * per_sample(active[:, s], x1).astype(xt.dtype))
    targets.append(x1 - x0)
  return tuple(inputs), tuple(targets)


def masked_stage_loss(
  pred: Sequence[jax.Array],
  targets: Sequence[jax.Array],
  active: jax.Array,
  stage_weights: Sequence[float] | None = None,
  *,
  sample_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DFM loss: per-stage element-mean squared error, weighted sum over active stages,
  mean over the batch.

  Args:
    pred, targets: S arrays ``[B, ...]`` each.
    active: ``[B, S]`` mask (0 masks a stage's loss).
    stage_weights: optional ``[S]`` constant weights.
    sample_weights: optional ``[B, S]`` per-sample, per-stage weights multiplying each stage's
      element-mean squared error (e.g. ``1 / c_out(t_s)^2`` under preconditioning, which makes
      the loss the unit-variance regression of the raw network).
  Returns:
    (scalar loss, metrics) where metrics hold ``loss_stage{s}`` (the weighted per-stage error,
    mean over the samples in which stage s is active; 0 if none) and ``frac_main_stage{s}``;
    with ``sample_weights`` also ``mse_stage{s}``, the unweighted data-space error.
  """
  num_stages = len(targets)
  weights = jnp.ones((num_stages,)) if stage_weights is None else jnp.asarray(stage_weights)
  mse = jnp.stack(
    [
      jnp.mean(
        jnp.square(p.astype(jnp.float32) - y.astype(jnp.float32)), axis=tuple(range(1, y.ndim))
      )
      for p, y in zip(pred, targets)
    ],
    axis=1,
  )  # [B, S]
  per_stage = mse if sample_weights is None else mse * sample_weights.astype(jnp.float32)
  loss = jnp.mean(jnp.sum(per_stage * active * weights[None, :], axis=1))
  metrics = {"loss": loss}
  counts = active.sum(axis=0)
  main = jnp.sum(active, axis=1) - 1  # index of the main stage
  for s in range(num_stages):
    denom = jnp.maximum(counts[s], 1.0)
    metrics[f"loss_stage{s + 1}"] = (per_stage[:, s] * active[:, s]).sum() / denom
    if sample_weights is not None:
      metrics[f"mse_stage{s + 1}"] = (mse[:, s] * active[:, s]).sum() / denom
    metrics[f"frac_main_stage{s + 1}"] = jnp.mean((main == s).astype(jnp.float32))
  return loss, metrics


# The model as the objective and the samplers see it: ``(stage inputs, t [B, S], labels [B],
# stage_index [B]) -> S velocities`` (each like its input; t = 0 noise, t = 1 data).
VelocityFn = Callable[[tuple, jax.Array, jax.Array, jax.Array], tuple]


def dfm_training_loss(
  velocity_fn: VelocityFn,
  key: jax.Array,
  stages: Sequence[jax.Array],
  labels: jax.Array,
  cfg: FlowConfig,
  *,
  null_label: int,
  loss_weight_fn: Callable[[jax.Array], jax.Array] | None = None,
  step: jax.Array | int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One Monte-Carlo estimate of the DFM loss.

  Args:
    velocity_fn: ``(inputs, t [B, S], labels [B], stage_index [B]) -> S velocities``.
    key: PRNG key; split into (timesteps, noise, label dropout).
    stages: S clean stages ``[B, ...]`` coarse to fine (e.g. ``Decomposition.split(x)``).
    labels: int ``[B]`` class labels.
    cfg: the timestep distribution, label dropout (the probability of replacing a label by
      ``null_label``) and stage weights; ``cfg.num_stages`` must equal ``len(stages)``.
    null_label: the label index meaning "no class" (classifier-free guidance).
    loss_weight_fn: optional ``t [B, S] -> [B, S]`` weights of each sample's per-stage error;
      pass ``model.loss_weights`` of a preconditioned ``DFMDiT`` (``1 / c_out(t)^2``).
      Inactive stages stay masked whatever their weight.
    step: the training step, for a p_q schedule (``cfg.final_stage_probs``).
  Returns:
    (scalar loss, metrics dict).
  """
  if cfg.num_stages != len(stages):
    raise ValueError(f"timestep config has {cfg.num_stages} stages, data has {len(stages)}")
  batch = stages[0].shape[0]
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  main_stage, t = sample_stage_times(k_t, batch, cfg, step)
  active = active_mask(main_stage, cfg.num_stages)
  noise_keys = jax.random.split(k_noise, len(stages))
  noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(noise_keys, stages)]
  inputs, targets = noisy_inputs(stages, noise, t, active)
  labels = drop_labels(k_drop, labels, cfg.label_dropout, null_label)
  pred = velocity_fn(inputs, t, labels, main_stage)
  sample_weights = None if loss_weight_fn is None else loss_weight_fn(t)
  return masked_stage_loss(pred, targets, active, cfg.stage_weights, sample_weights=sample_weights)


def drop_labels(key: jax.Array, labels: jax.Array, rate: float, null_label: int) -> jax.Array:
  """int ``[B]``: each label replaced by ``null_label`` with probability ``rate``."""
  return jnp.where(jax.random.bernoulli(key, rate, labels.shape), null_label, labels)
