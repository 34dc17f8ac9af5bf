"""Per-stage EDM-style preconditioning: the algebra, unit variances on real digits, S = 1, and
the statistics stored with the model (t = 0 noise, t = 1 data)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax import data, decompose, dit, flow, precondition

T_GRID = np.linspace(0.05, 0.95, 10)


def network_targets(velocities, stages, t, mean, std):
  """The regression target of F (the inverse of the model's output map): ``(v - m - c_skip * xc) / c_out`` per stage.

  Args:
    velocities: S targets ``v = x1 - x0 [B, ...]``.
    stages: S noisy stages ``x_t [B, ...]``.
    t: ``[B, S]``; mean, std: ``[S]``.
  """
  centred, _ = precondition.network_inputs(stages, t, mean, std)
  mean = jnp.asarray(mean, jnp.float32)
  _, c_skip, c_out = precondition.coefficients(t, mean, std)
  out = []
  for s, (v, xc) in enumerate(zip(velocities, centred)):
    out.append(
      (v.astype(jnp.float32) - mean[s] - flow.per_sample(c_skip[:, s], xc) * xc)
      / flow.per_sample(c_out[:, s], xc)
    )
  return tuple(out)


def wrap_velocity_fn(raw_fn, mean, std):
  """The model's composition written out: a raw network wrapped into a data-space velocity
  function plus its loss weights.

  Args:
    raw_fn: ``(network inputs, t [B, S], labels [B], stage_index [B]) -> S outputs F``.
    mean, std: ``[S]`` per-stage data statistics.
  Returns:
    (``velocity_fn(x_t stages, t, labels, stage_index) -> S velocities``, for
    ``flow.dfm_training_loss`` and ``sampler.sample``; ``loss_weight_fn(t [B, S]) -> [B, S]``,
    for ``dfm_training_loss(..., loss_weight_fn=...)``).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def velocity_fn(stages, t, labels, stage_index):
    centred, inputs = precondition.network_inputs(stages, t, mean, std)
    raw = raw_fn(inputs, t, labels, stage_index)
    return precondition.data_velocities(raw, centred, t, mean, std)

  return velocity_fn, lambda t: precondition.loss_weights(t, std)


@pytest.fixture(scope="module")
def digits():
  """The embedded MNIST-5k digits, zero-padded to 32x32 and scaled to [-1, 1]: [5000, 32, 32, 1]."""
  images, _ = data.load_mnist5k()
  return data.pad_to(images, 32).astype(np.float32) / 127.5 - 1.0


def _batches(x, size=500):
  return [x[i : i + size] for i in range(0, len(x), size)]


def test_coefficients_closed_form_and_unit_variance_algebra():
  t = jnp.linspace(0.0, 1.0, 11)
  for sd in (0.05, 0.3, 1.0, 2.5):
    c_in, c_skip, c_out = precondition.coefficients(t, 0.7, sd)
    d = t**2 * sd**2 + (1 - t) ** 2
    np.testing.assert_allclose(c_in, 1 / np.sqrt(d), rtol=1e-6)
    np.testing.assert_allclose(c_skip, (t * sd**2 - (1 - t)) / d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_out, sd / np.sqrt(d), rtol=1e-6)
    # Second moment of the network target for x1 = m + sd z1, x0 = z0 (independent unit z):
    # v - m - c_skip xc = sd (1 - c_skip t) z1 - (1 + c_skip (1 - t)) z0.
    var = (sd**2 * (1 - c_skip * t) ** 2 + (1 + c_skip * (1 - t)) ** 2) / c_out**2
    np.testing.assert_allclose(var, 1.0, rtol=1e-5)
    np.testing.assert_allclose(
      precondition.loss_weights(t[:, None], jnp.array([sd]))[:, 0], 1 / c_out**2, rtol=1e-5
    )


@pytest.mark.parametrize("num_stages", [2, 3])
def test_unit_variance_network_inputs_and_targets_on_digits(digits, num_stages):
  """Statistics from one half of the digits; variances measured on the other half."""
  dec = decompose.build("laplacian", num_stages)
  stats = precondition.stats_for_model(dec, _batches(digits[:2500]))
  mean, std = jnp.asarray(stats.mean), jnp.asarray(stats.std)
  stages = dec.split(jnp.asarray(digits[2500:4500]))
  batch = stages[0].shape[0]
  keys = jax.random.split(jax.random.key(0), num_stages)
  noise = [jax.random.normal(k, x.shape) for k, x in zip(keys, stages)]
  raw_var = np.zeros((len(T_GRID), num_stages))
  for i, tv in enumerate(T_GRID):
    t = jnp.full((batch, num_stages), tv, jnp.float32)
    xt, v = flow.noisy_inputs(stages, noise, t, jnp.ones((batch, num_stages)))
    _, inputs = precondition.network_inputs(xt, t, mean, std)
    targets = network_targets(v, xt, t, mean, std)
    for s in range(num_stages):
      assert 0.9 < float(jnp.var(inputs[s])) < 1.1, (num_stages, s, tv)
      assert 0.9 < float(jnp.var(targets[s])) < 1.1, (num_stages, s, tv)
      raw_var[i, s] = float(jnp.var(xt[s]))
  # Without preconditioning the finest stage's input variance spans a factor of about 20
  # (0.90 at t = 0.05 down to 0.04 near t = 0.95: its std is about 0.21).
  fine = raw_var[:, -1]
  assert fine.max() > 0.85 and fine.min() < 0.06 and fine.max() / fine.min() > 15
  np.testing.assert_allclose(stats.std[-1], 0.21, atol=0.02)


def test_stats_for_model_follow_a_standardising_decomposition(digits):
  dec = decompose.build("laplacian", 2)
  raw = precondition.stats_for_model(dec, _batches(digits[:1000]))
  std_dec = dec.with_stats(decompose.estimate_stats(dec, _batches(digits[:1000])))
  seen = precondition.stats_for_model(std_dec, _batches(digits[:1000]))
  np.testing.assert_allclose(seen.mean, 0.0, atol=1e-5)
  np.testing.assert_allclose(seen.std, 1.0, atol=1e-4)
  assert abs(raw.mean[0] + 0.8) < 0.05  # the zero-padded background dominates the coarse stage


def _model(stage_shapes, precondition_on=True, **kw):
  cfg = dit.DiTConfig(
    stage_shapes=stage_shapes,
    patch_size=2,
    hidden_size=32,
    depth=1,
    num_heads=4,
    num_classes=10,
    precondition=precondition_on,
    **kw,
  )
  return dit.DFMDiT(cfg, rngs=nnx.Rngs(0))


def test_estimate_and_set_fills_model_and_ema(digits):
  class State:  # the fields estimate_and_set uses from a TrainState
    def __init__(self, model):
      self.model, self.ema = model, nnx.clone(model)

  state = State(_model(((16, 16, 1), (32, 32, 1))))
  dec = decompose.build("laplacian", 2)
  stats = precondition.estimate_and_set(state, dec, _batches(digits[:1000]))
  for m in (state.model, state.ema):
    np.testing.assert_allclose(m.data_mean[...], stats.mean, rtol=1e-6)
    np.testing.assert_allclose(m.data_std[...], stats.std, rtol=1e-6)
  single = _model(((32, 32, 1),))
  precondition.estimate_and_set(single, decompose.build("laplacian", 1), _batches(digits[:500]))
  assert float(single.data_std[0]) > 0.3


def test_zero_heads_give_the_skip_path_at_init():
  model = _model(((8, 8, 1), (16, 16, 1)))
  model.set_data_stats((-0.8, 0.05), (0.4, 0.2))
  keys = jax.random.split(jax.random.key(1), 2)
  xt = (jax.random.normal(keys[0], (3, 8, 8, 1)), jax.random.normal(keys[1], (3, 16, 16, 1)))
  t = jnp.array([[0.1, 0.0], [0.5, 0.3], [0.9, 0.8]])
  out = nnx.jit(lambda m: m(xt, t, jnp.array([1, 2, 10]), jnp.array([0, 1, 1])))(model)
  for s, (x, v) in enumerate(zip(xt, out)):
    m, sd = (-0.8, 0.05)[s], (0.4, 0.2)[s]
    ts = np.asarray(t[:, s])[:, None, None, None]
    d = ts**2 * sd**2 + (1 - ts) ** 2
    expected = m + (ts * sd**2 - (1 - ts)) / d * (np.asarray(x) - ts * m)
    np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6)


def test_single_stage_is_preconditioned_flow_matching(digits):
  """S = 1 with preconditioning: the DFM loss equals the unit-variance regression of F."""
  model = _model(((32, 32, 1),), stage_index_embed=False)
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(
    model,
    jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.1 for k, x in zip(keys, leaves)]),
  )
  m, sd = -0.75, 0.55
  model.set_data_stats((m,), (sd,))
  x1 = jnp.asarray(digits[:16])
  labels = jnp.arange(16) % 10

  @nnx.jit
  def run(model):
    record = {}

    def velocity_fn(inputs, t, labels_in, stage_index):
      record["xt"], record["t"] = inputs[0], t[:, 0]
      return model(inputs, t, labels_in, stage_index)

    loss, metrics = flow.dfm_training_loss(
      velocity_fn,
      jax.random.key(4),
      (x1,),
      labels,
      flow.FlowConfig(label_dropout=0.0),
      null_label=10,
      loss_weight_fn=model.loss_weights,
    )
    return loss, metrics, record["xt"], record["t"]

  loss, metrics, xt, t = run(model)
  tb = t[:, None, None, None]
  x0 = (xt - tb * x1) / (1 - tb)
  d = tb**2 * sd**2 + (1 - tb) ** 2
  c_in, c_skip, c_out = 1 / jnp.sqrt(d), (tb * sd**2 - (1 - tb)) / d, sd / jnp.sqrt(d)
  xc = xt - tb * m
  f = nnx.jit(lambda model, x: model.network((x,), t[:, None], labels)[0])(model, c_in * xc)
  reference = jnp.mean((f - (x1 - x0 - m - c_skip * xc) / c_out) ** 2)
  np.testing.assert_allclose(float(loss), float(reference), rtol=2e-4)
  # The data-space error is reported alongside.
  mse = jnp.mean((m + c_skip * xc + c_out * f - (x1 - x0)) ** 2)
  np.testing.assert_allclose(float(metrics["mse_stage1"]), float(mse), rtol=2e-4)


def test_wrap_velocity_fn_matches_the_model():
  model = _model(((8, 8, 1), (16, 16, 1)))
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  nnx.update(
    model,
    jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.1 for k, x in zip(keys, leaves)]),
  )
  mean, std = (0.3, -0.1), (0.5, 0.15)
  model.set_data_stats(mean, std)
  velocity_fn, weight_fn = wrap_velocity_fn(model.network, mean, std)
  keys = jax.random.split(jax.random.key(6), 2)
  xt = (jax.random.normal(keys[0], (2, 8, 8, 1)), jax.random.normal(keys[1], (2, 16, 16, 1)))
  t = jnp.array([[0.2, 0.0], [0.7, 0.4]])
  args = (xt, t, jnp.array([3, 10]), jnp.array([0, 1]))
  for a, b in zip(jax.jit(velocity_fn)(*args), nnx.jit(lambda m, a: m(*a))(model, args)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(weight_fn(t), model.loss_weights(t), rtol=1e-6)


def test_zero_network_output_is_the_gaussian_optimal_velocity():
  """F = 0 gives ``m + c_skip * xc``, which equals ``(E[X | x_t] - x_t) / (1 - t)`` for
  X ~ N(m, sigma^2): a new, zero-initialised stage samples white noise at its band's mean and
  std, not an empty band."""
  rng = np.random.default_rng(0)
  m, sigma = 0.3, 0.2
  t = jnp.asarray(rng.uniform(0.01, 0.99, (64, 1)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  (v,) = precondition.data_velocities(
    (jnp.zeros_like(x),),
    precondition.network_inputs((x,), t, jnp.asarray([m]), jnp.asarray([sigma]))[0],
    t,
    jnp.asarray([m]),
    jnp.asarray([sigma]),
  )
  posterior_mean = m + t * sigma**2 * (x - t * m) / (t**2 * sigma**2 + (1 - t) ** 2)
  np.testing.assert_allclose(
    np.asarray(v), np.asarray((posterior_mean - x) / (1 - t)), rtol=2e-4, atol=2e-5
  )
