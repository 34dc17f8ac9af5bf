"""The train state (model, optimizer, EMA) and the pure, jit-able training step."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dfm_jax import dit
from dfm_jax.experiment import Experiment


def make_optimizer(
  optim, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """AdamW with linear warm-up, then constant or cosine decay to 0 at ``total_steps``; clipping."""
  warmup = optax.linear_schedule(0.0, optim.learning_rate, max(int(optim.warmup_steps), 1))
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(
      optim.learning_rate, max(int(total_steps) - int(optim.warmup_steps), 1)
    )
  else:
    decay = optax.constant_schedule(optim.learning_rate)
  schedule = optax.join_schedules([warmup, decay], [int(optim.warmup_steps)])
  chain = []
  if optim.grad_clip and optim.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(optim.grad_clip))
  chain.append(
    optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  )
  # A non-finite gradient yields a zero update and leaves the optimizer state as it was; the
  # loop stops at its next check. Gating the update (not selecting between whole states) lets
  # XLA update the donated state in place.
  return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=2**30), schedule


class TrainState(nnx.Module):
  """Everything a training step changes: the model, its optimizer, and the EMA model."""

  def __init__(self, model: dit.DFMDiT, tx: optax.GradientTransformation, ema_decay: float):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.ema = nnx.clone(model)  # used for sampling; updated inside the step
    self.ema_decay = ema_decay


def create_train_state(exp: Experiment, optim, total_steps: int, seed: int) -> TrainState:
  model = dit.DFMDiT(exp.model, rngs=nnx.Rngs(seed))
  tx, _ = make_optimizer(optim, total_steps)
  return TrainState(model, tx, float(optim.ema_decay))


@dataclasses.dataclass(frozen=True)
class StepSettings:
  label_dropout: float
  stage_weights: tuple[float, ...] | None


def train_step(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  exp: Experiment,
  settings: StepSettings,
  lr_schedule: Callable,
) -> tuple[nnx.State, dict[str, jax.Array]]:
  """One optimisation step on ``batch = {'image': [B, H, W, C], 'label': [B]}``.

  Pure: ``(state, batch, key) -> (new state, metrics)``; the caller jits it with shardings and
  donates ``state``. A step whose loss or gradient is not finite leaves the parameters, optimizer
  moments and EMA unchanged and reports ``nonfinite = 1`` so the caller can stop with the last
  good state intact.
  """
  ts = nnx.merge(graphdef, state)
  method = exp.method

  def loss_fn(model):
    return method.loss(
      model,
      key,
      batch["image"],
      batch["label"],
      label_dropout=settings.label_dropout,
      stage_weights=settings.stage_weights,
    )

  (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(ts.model)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  step = ts.optimizer.step[...]
  ts.optimizer.update(ts.model, grads)
  decay = jnp.where(finite, ts.ema_decay, 1.0)  # a skipped step leaves the EMA as it is
  ema_params = nnx.state(ts.ema, nnx.Param)
  new_params = nnx.state(ts.model, nnx.Param)
  nnx.update(
    ts.ema, jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, new_params)
  )
  new = nnx.state(ts)
  metrics = dict(
    metrics,
    grad_norm=grad_norm,
    learning_rate=lr_schedule(step),
    nonfinite=(~finite).astype(jnp.int32),
  )
  return new, metrics
