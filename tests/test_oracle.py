"""The oracle (exact optimal velocity of a finite data set) and the automatic stage schedule,
against closed forms: the two-point posterior, and the Euler sampler on Gaussian bands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm_jax import decompose, oracle, sampler as sampler_lib, stage_schedule


def two_point_velocity(x, t, a, b):
  """Numpy closed form: posterior weights of points a and b from every stage, then
  ``v_s = (E[Y_s] - x_s) / (1 - t_s)``. ``x, a, b``: lists of per-stage arrays, ``t [S]``."""
  la = sum(-np.sum((xs - ts * al) ** 2) / (2 * (1 - ts) ** 2) for xs, ts, al in zip(x, t, a))
  lb = sum(-np.sum((xs - ts * bl) ** 2) / (2 * (1 - ts) ** 2) for xs, ts, bl in zip(x, t, b))
  wa = 1.0 / (1.0 + np.exp(lb - la))
  return [(wa * al + (1 - wa) * bl - xs) / (1 - ts) for xs, ts, al, bl in zip(x, t, a, b)]


def test_two_point_posterior_matches_closed_form():
  rng = np.random.default_rng(0)
  shapes = [(2, 2, 1), (4, 4, 1)]
  a = [rng.normal(size=s).astype(np.float32) * 0.5 for s in shapes]
  b = [rng.normal(size=s).astype(np.float32) * 0.5 for s in shapes]
  data = [jnp.stack([al, bl]) for al, bl in zip(a, b)]
  fn = oracle.optimal_velocity_fn(data)
  for t in ([0.3, 0.0], [0.8, 0.4], [0.95, 0.6]):
    x = [rng.normal(size=(1,) + s).astype(np.float32) for s in shapes]
    out = fn(tuple(jnp.asarray(v) for v in x), jnp.asarray([t], jnp.float32), None, None)
    want = two_point_velocity([v[0] for v in x], t, a, b)
    for got, ref in zip(out, want):
      np.testing.assert_allclose(np.asarray(got)[0], ref, rtol=1e-4, atol=1e-5)


def test_label_restricts_posterior_to_its_class():
  a, b = np.full((1, 2, 2, 1), 1.0, np.float32), np.full((1, 2, 2, 1), -1.0, np.float32)
  fn = oracle.optimal_velocity_fn([jnp.concatenate([a, b])], jnp.asarray([0, 1]), null_label=2)
  x = jnp.zeros((3, 2, 2, 1))
  t = jnp.full((3, 1), 0.5)
  (v,) = fn((x,), t, jnp.asarray([0, 1, 2]), None)
  np.testing.assert_allclose(np.asarray(v[0]), 2.0, rtol=1e-6)  # (a - 0) / 0.5
  np.testing.assert_allclose(np.asarray(v[1]), -2.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(v[2]), 0.0, atol=1e-6)  # null: halfway, mean 0


def test_exact_flow_lands_on_the_points_in_both_stages_with_even_odds():
  """Many steps: every sample ends on one of the two points, each picked about half the time."""
  rng = np.random.default_rng(1)
  data = rng.uniform(-1, 1, size=(2, 8, 8, 1)).astype(np.float32)
  dec = decompose.build("laplacian", 2)
  cfg = sampler_lib.SamplerConfig(steps_per_stage=(150, 150), thresholds=(0.8,))
  out = oracle.sample(dec, data, None, cfg, np.full(400, 1), null_label=1, batch_size=200)
  dist = oracle.nearest_distance(out.images, data)
  assert dist.max() < 1e-3
  picked_a = np.mean(
    np.abs(out.images - data[0]).max(axis=(1, 2, 3))
    < np.abs(out.images - data[1]).max(axis=(1, 2, 3))
  )
  assert 0.4 < picked_a < 0.6
  np.testing.assert_allclose(
    oracle.band_variance_kept(dec, data[np.arange(400) % 2], data), (1.0, 1.0), rtol=1e-5
  )


def test_gaussian_variance_kept_matches_the_sampler_on_gaussian_bands():
  """The closed form against the project's sampler driven by the exact Gaussian velocity."""
  stds = (0.6, 0.15)
  steps, thresholds = (12, 5), (0.7,)

  def velocity_fn(inputs, t, labels, stage_index):
    out = []
    for s, x in enumerate(inputs):
      ts = t[:, s].reshape((-1,) + (1,) * (x.ndim - 1))
      var = stds[s] ** 2
      mean = ts * var / (ts**2 * var + (1 - ts) ** 2) * x
      out.append((mean - x) / jnp.maximum(1 - ts, 1e-6))
    return tuple(out)

  noise = tuple(jax.random.normal(jax.random.key(s), (20000, 4)) for s in range(2))
  cfg = sampler_lib.SamplerConfig(steps_per_stage=steps, thresholds=thresholds)
  out = sampler_lib.sample(velocity_fn, noise, jnp.zeros(20000, jnp.int32), cfg, null_label=1)
  measured = [float(jnp.var(x)) / s**2 for x, s in zip(out["stages"], stds)]
  closed = stage_schedule.gaussian_variance_kept(stds, steps, thresholds)
  np.testing.assert_allclose(measured, closed, rtol=0.03)
  assert closed[1] < 0.8  # a faint band with few steps loses variance: the test has teeth


def test_auto_schedule():
  # one stage: every step, no threshold
  assert stage_schedule.auto_schedule((0.6,), 40) == ((40,), ())
  steps, th = stage_schedule.auto_schedule((0.63, 0.21), 40)
  assert sum(steps) == 40 and len(th) == 1
  # a faint band hands over later and keeps more variance than the hand-set 30 + 10 @ 0.7
  assert th[0] > stage_schedule.handover_thresholds((1.0, 1.0))[0]
  err = lambda s, t: np.sum(np.log(stage_schedule.gaussian_variance_kept((0.63, 0.21), s, t)) ** 2)
  assert err(steps, th) < err((30, 10), (0.7,))
  # thresholds stay strictly increasing for equal bands
  assert stage_schedule.handover_thresholds((1.0, 1.0, 1.0)) == (0.75, 0.76)
  with pytest.raises(ValueError, match="positive"):
    stage_schedule.auto_schedule((0.5, 0.0), 40)


def test_auto_schedule_in_the_sampler_follows_the_models_stored_stds():
  from flax import nnx

  from dfm_jax import experiment, precondition, sampling
  from dfm_jax.config_defaults import base_config
  from dfm_jax.train_state import create_train_state

  c = base_config()
  c.data.resolution, c.data.channels, c.data.num_classes = 8, 1, 2
  c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 32, 1, 2, 1
  c.sampler.steps_per_stage, c.sampler.thresholds = (6, 4), (0.7,)
  c.sampler.auto_schedule = True
  exp = experiment.from_config(c, check_data=False)
  state = create_train_state(exp, c.optim, 10, seed=0)
  stats = decompose.StageStats((0.0, 0.0), (0.6, 0.1))
  precondition.set_stats(state, stats)
  graphdef, ema = nnx.split(state.ema)
  labels = jnp.asarray([0, 1])
  auto = sampling.make_sample_fn(graphdef, exp)(ema, jax.random.key(0), labels)
  steps, th = stage_schedule.auto_schedule(stats.std, 10)
  assert (steps, th) != ((6, 4), (0.7,))
  explicit = sampler_lib.SamplerConfig(steps, th)
  want = sampling.make_sample_fn(graphdef, exp, explicit)(ema, jax.random.key(0), labels)
  np.testing.assert_array_equal(np.asarray(auto["images"]), np.asarray(want["images"]))
  assert int(auto["nfe"]) == 10
  c.method = "fm"  # any method but DFM: it has its own schedule
  with pytest.raises(ValueError, match="auto_schedule"):
    experiment.from_config(c, check_data=False)
