"""The train state (model, optimizer, EMA) and the pure, jit-able training step."""

from __future__ import annotations

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
  """Everything a training step changes: the model, its optimizer, the EMA model and, for a
  method with ``Method.snapshot_follows`` (the cascade), a snapshot of the EMA model (not
  trained, not averaged; the step refreshes it while ``snapshot_follows(step)`` holds)."""

  def __init__(
    self,
    model: dit.DFMDiT,
    tx: optax.GradientTransformation,
    ema_decay: float,
    snapshot: bool = False,
  ):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.ema = nnx.clone(model)  # used for sampling; updated inside the step
    if snapshot:
      self.snapshot = nnx.clone(model)
    self.ema_decay = ema_decay


def create_train_state(exp: Experiment, optim, total_steps: int, seed: int) -> TrainState:
  model = dit.DFMDiT(exp.model, rngs=nnx.Rngs(seed))
  tx, _ = make_optimizer(optim, total_steps)
  snapshot = exp.method.snapshot_follows is not None
  return TrainState(model, tx, float(optim.ema_decay), snapshot=snapshot)


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """``[B, ...] -> [k, B / k, ...]`` with microbatch i holding rows ``i, i + k, i + 2k, ...``.

  Strided, not contiguous: with the batch split over the data-parallel devices in contiguous
  blocks of ``B / D`` rows, every device holds ``B / (D k)`` rows of each microbatch, so the
  split moves no data between devices (it needs ``B`` divisible by ``k D``).
  """
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)


def train_step(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  exp: Experiment,
  lr_schedule: Callable,
  grad_accum_steps: int = 1,
) -> tuple[nnx.State, dict[str, jax.Array]]:
  """One optimisation step on ``batch = {'image': [B, H, W, C], 'label': [B]}``.

  Pure: ``(state, batch, key) -> (new state, metrics)``; the caller jits it with shardings and
  donates ``state``. A step whose loss or gradient is not finite leaves the parameters, optimizer
  moments, EMA (and snapshot) unchanged and reports ``nonfinite = 1`` so the caller can stop with the last
  good state intact.

  With ``grad_accum_steps = k > 1`` (``optim.grad_accum_steps``) the batch is split into k microbatches of ``B / k``
  (:func:`split_microbatches`); a ``lax.scan`` takes the loss and gradients of microbatch i with
  key ``fold_in(key, i)``, and the averaged gradients (and metrics) make one optimizer update.
  """
  ts = nnx.merge(graphdef, state)
  method = exp.method
  step = ts.optimizer.step[...]

  def loss_fn(model, key, images, labels):
    return method.loss(model, key, images, labels, step=step)

  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  k = int(grad_accum_steps)
  if k == 1:
    (loss, metrics), grads = grad_fn(ts.model, key, batch["image"], batch["label"])
  else:
    # jax.value_and_grad over the parameters (nnx.value_and_grad refuses a model merged inside
    # the scan from variables of the enclosing trace).
    model_def, params, rest = nnx.split(ts.model, nnx.Param, ...)
    micro = {name: split_microbatches(batch[name], k) for name in ("image", "label")}

    def micro_loss(params, key, images, labels):
      return loss_fn(nnx.merge(model_def, params, rest), key, images, labels)

    def accumulate(total, inputs):
      i, images, labels = inputs
      (loss, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(
        params, jax.random.fold_in(key, i), images, labels
      )
      return jax.tree.map(jnp.add, total, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, per_micro) = jax.lax.scan(
      accumulate, zeros, (jnp.arange(k), micro["image"], micro["label"])
    )
    grads = jax.tree.map(lambda g: g / k, grads)
    loss = losses.mean()
    metrics = jax.tree.map(lambda m: m.mean(0), per_micro)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  ts.optimizer.update(ts.model, grads)
  decay = jnp.where(finite, ts.ema_decay, 1.0)  # a skipped step leaves the EMA as it is
  ema_params = nnx.state(ts.ema, nnx.Param)
  new_params = nnx.state(ts.model, nnx.Param)
  nnx.update(
    ts.ema, jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, new_params)
  )
  if hasattr(ts, "snapshot"):  # the method keeps one (Method.snapshot_follows)
    follow = method.snapshot_follows(step)
    nnx.update(
      ts.snapshot,
      jax.tree.map(lambda s, e: jnp.where(follow, e, s), nnx.state(ts.snapshot), nnx.state(ts.ema)),
    )
  new = nnx.state(ts)
  metrics = dict(
    metrics,
    grad_norm=grad_norm,
    learning_rate=lr_schedule(step),
    nonfinite=(~finite).astype(jnp.int32),
  )
  return new, metrics
