"""The stage-scheduled sampler: schedule, evaluation counts, CFG, and closed-form Gaussians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm_jax import decompose, sampler


def test_schedule_every_stage_ends_at_one_and_is_monotone():
  times, phase = sampler.stage_schedule((30, 10), (0.7,))
  assert times.shape == (41, 2) and phase.shape == (40,)
  np.testing.assert_array_equal(times[0], 0.0)
  np.testing.assert_array_equal(times[-1], 1.0)
  assert (np.diff(times, axis=0) >= -1e-7).all()
  np.testing.assert_allclose(times[30], [0.7, 0.0], atol=1e-6)  # stage 2 starts at tau
  # During the last phase stage 1 finishes linearly alongside stage 2.
  np.testing.assert_allclose(times[35], [0.85, 0.5], atol=1e-6)
  assert (phase[:30] == 0).all() and (phase[30:] == 1).all()
  times, phase = sampler.stage_schedule((4, 3, 2), (0.5, 0.9))
  np.testing.assert_allclose(times[4], [0.5, 0.0, 0.0])
  np.testing.assert_allclose(times[7], [1.0, 0.9, 0.0], atol=1e-6)
  np.testing.assert_array_equal(times[-1], 1.0)


@pytest.mark.parametrize("steps,thresholds,match", [
    ((30, 10), (), "need 1 thresholds"),
    ((30, 10, 5), (0.9, 0.7), "strictly increasing"),
    ((30, 10), (1.0,), "inside \\(0, 1\\)"),
    ((30, 0), (0.5,), "at least one step"),
])
def test_schedule_validation(steps, thresholds, match):
  with pytest.raises(ValueError, match=match):
    sampler.SamplerConfig(steps, thresholds)


def _counting_velocity(counter, fn):
  def velocity_fn(inputs, t, labels, stage_index):
    jax.debug.callback(lambda b: counter.append(int(b)), labels.shape[0])
    return fn(inputs, t, labels, stage_index)
  return velocity_fn


def _zero_velocity(inputs, t, labels, stage_index):
  return tuple(jnp.zeros_like(x) for x in inputs)


@pytest.mark.parametrize("solver,per_step", [("euler", 1), ("heun", 2)])
def test_model_evaluations_equal_configured_steps(solver, per_step):
  calls = []
  cfg = sampler.SamplerConfig((6, 3), (0.8,), solver=solver)
  noise = (jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1)))
  run = jax.jit(lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg,
                                            null_label=10))
  out = run(noise, jnp.zeros(2, jnp.int32))
  jax.effects_barrier()
  assert len(calls) == 9 * per_step and set(calls) == {2}
  assert int(out["nfe"]) == 9 * per_step


def test_cfg_doubles_the_batch_only_inside_the_interval():
  calls = []
  cfg = sampler.SamplerConfig((10,), (), cfg_scale=3.0, guidance_interval=(0.25, 0.55))
  run = jax.jit(lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg,
                                            null_label=10))
  out = run((jnp.zeros((3, 2, 2, 1)),), jnp.zeros(3, jnp.int32))
  jax.effects_barrier()
  # Step k starts at t = k / 10: guided for t in {0.3, 0.4, 0.5}.
  assert calls == [3, 3, 3, 6, 6, 6, 3, 3, 3, 3]
  assert int(out["nfe"]) == 13


def test_cfg_combines_conditional_and_unconditional_per_stage():
  def velocity_fn(inputs, t, labels, stage_index):  # cond -> 1, uncond -> 0
    v = (labels != 10).astype(jnp.float32)[:, None, None, None]
    return tuple(jnp.broadcast_to(v, x.shape) for x in inputs)
  # Stage 1 is inside the interval during the whole run, stage 2 only from t = 0.5 on.
  cfg = sampler.SamplerConfig((1, 1), (0.4,), cfg_scale=2.0, guidance_interval=(0.0, 0.5))
  out = sampler.sample(velocity_fn, (jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 2, 2, 1))),
                       jnp.zeros(1, jnp.int32), cfg, null_label=10)
  # Stage 1: step 1 guided (v = 2) over dt 0.4, step 2 at t = 0.4 guided over dt 0.6.
  np.testing.assert_allclose(out["stages"][0], 2.0, atol=1e-6)
  # Stage 2: only step 2 moves it, at t = 0 (inside): v = 2 over dt 1.
  np.testing.assert_allclose(out["stages"][1], 2.0, atol=1e-6)


def _gaussian_velocity(mu, sd):
  """The exact flow-matching velocity for independent N(mu_s, sd_s^2) stages and N(0, 1) noise."""
  def velocity_fn(inputs, t, labels, stage_index):
    out = []
    for s, x in enumerate(inputs):
      ts = t[:, s].reshape((-1,) + (1,) * (x.ndim - 1))
      var = ts ** 2 * sd[s] ** 2 + (1 - ts) ** 2
      out.append(mu[s] + (ts * sd[s] ** 2 - (1 - ts)) / var * (x - ts * mu[s]))
    return tuple(out)
  return velocity_fn


@pytest.mark.parametrize("solver,steps,tol", [("euler", (150, 100), 0.03),
                                              ("heun", (30, 10), 0.02)])
def test_exact_gaussian_field_maps_noise_to_data_stage_by_stage(solver, steps, tol):
  mu, sd = (1.0, -0.5), (0.5, 2.0)
  keys = jax.random.split(jax.random.key(0), 2)
  noise = (jax.random.normal(keys[0], (2000, 4, 4, 1)),
           jax.random.normal(keys[1], (2000, 8, 8, 1)))
  cfg = sampler.SamplerConfig(steps, (0.7,), solver=solver)
  out = jax.jit(lambda n: sampler.sample(_gaussian_velocity(mu, sd), n,
                                         jnp.zeros(2000, jnp.int32), cfg, null_label=10))(noise)
  for s, x in enumerate(out["stages"]):
    assert abs(float(x.mean()) - mu[s]) < tol * max(1, abs(mu[s])), (s, float(x.mean()))
    assert abs(float(x.std()) / sd[s] - 1) < tol, (s, float(x.std()))


def test_single_stage_is_plain_flow_matching_euler():
  def velocity_fn(inputs, t, labels, stage_index):
    return (jnp.sin(inputs[0]) * t[:, :1, None, None] - 0.3 * labels[:, None, None, None],)
  x0 = jax.random.normal(jax.random.key(1), (4, 3, 3, 2))
  labels = jnp.arange(4)
  cfg = sampler.SamplerConfig((12,))
  out = sampler.sample(velocity_fn, (x0,), labels, cfg, null_label=10)
  x = x0
  for k in range(12):  # plain Euler from t = 0 (noise) to t = 1 (data)
    t = jnp.full((4, 1), k / 12)
    x = x + (1 / 12) * velocity_fn((x,), t, labels, None)[0]
  np.testing.assert_allclose(out["stages"][0], x, atol=1e-5)


def test_previews_and_images():
  dec = decompose.build("dwt", 2)  # Haar: a coarse-only preview is constant on 2x2 blocks
  mu, sd = (0.5, 0.0), (0.2, 1e-3)
  noise = (jax.random.normal(jax.random.key(0), (2, 4, 4, 1)),
           jax.random.normal(jax.random.key(1), (2, 4, 4, 3)))
  cfg = sampler.SamplerConfig((8, 4), (0.9,), solver="heun")
  out = sampler.sample(_gaussian_velocity(mu, sd), noise, jnp.zeros(2, jnp.int32), cfg,
                       null_label=10, decomposition=dec, previews=True)
  assert out["previews"].shape == (2, 2, 8, 8, 1)
  np.testing.assert_allclose(out["previews"][-1], out["images"], atol=1e-5)
  np.testing.assert_allclose(out["images"], dec.merge(out["stages"]), atol=1e-6)
  # The first preview is the upsampled coarse estimate: no fine detail yet.
  p1 = out["previews"][0]
  np.testing.assert_allclose(p1[:, ::2, ::2], p1[:, 1::2, 1::2], atol=1e-6)
  assert float(jnp.abs(out["images"][:, ::2, ::2] - out["images"][:, 1::2, 1::2]).max()) > 1e-4
