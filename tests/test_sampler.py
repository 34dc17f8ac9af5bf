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


@pytest.mark.parametrize(
  "steps,thresholds,match",
  [
    ((30, 10), (), "need 1 thresholds"),
    ((30, 10, 5), (0.9, 0.7), "strictly increasing"),
    ((30, 10), (1.0,), "inside \\(0, 1\\)"),
    ((30, 0), (0.5,), "at least one step"),
  ],
)
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


@pytest.mark.parametrize(
  "solver,final_euler,passes", [("euler", True, 9), ("heun", True, 17), ("heun", False, 18)]
)
def test_model_evaluations_equal_configured_steps(solver, final_euler, passes):
  """Euler: N passes; Heun: 2 N, or 2 N - 1 when the last step (ending at t = 1) is Euler."""
  calls = []
  cfg = sampler.SamplerConfig((6, 3), (0.8,), solver=solver, heun_final_euler=final_euler)
  noise = (jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1)))
  run = jax.jit(
    lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg, null_label=10)
  )
  out = run(noise, jnp.zeros(2, jnp.int32))
  jax.effects_barrier()
  assert len(calls) == passes and set(calls) == {2}
  assert int(out["nfe"]) == passes


def test_cfg_doubles_the_batch_only_inside_the_interval():
  calls = []
  cfg = sampler.SamplerConfig((10,), (), cfg_scale=3.0, guidance_interval=(0.25, 0.55))
  run = jax.jit(
    lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg, null_label=10)
  )
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
  out = sampler.sample(
    velocity_fn,
    (jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 2, 2, 1))),
    jnp.zeros(1, jnp.int32),
    cfg,
    null_label=10,
  )
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
      var = ts**2 * sd[s] ** 2 + (1 - ts) ** 2
      out.append(mu[s] + (ts * sd[s] ** 2 - (1 - ts)) / var * (x - ts * mu[s]))
    return tuple(out)

  return velocity_fn


@pytest.mark.parametrize(
  "solver,steps,tol", [("euler", (150, 100), 0.03), ("heun", (30, 10), 0.02)]
)
def test_exact_gaussian_field_maps_noise_to_data_stage_by_stage(solver, steps, tol):
  mu, sd = (1.0, -0.5), (0.5, 2.0)
  keys = jax.random.split(jax.random.key(0), 2)
  noise = (jax.random.normal(keys[0], (2000, 4, 4, 1)), jax.random.normal(keys[1], (2000, 8, 8, 1)))
  cfg = sampler.SamplerConfig(steps, (0.7,), solver=solver)
  out = jax.jit(
    lambda n: sampler.sample(
      _gaussian_velocity(mu, sd), n, jnp.zeros(2000, jnp.int32), cfg, null_label=10
    )
  )(noise)
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
  noise = (
    jax.random.normal(jax.random.key(0), (2, 4, 4, 1)),
    jax.random.normal(jax.random.key(1), (2, 4, 4, 3)),
  )
  cfg = sampler.SamplerConfig((8, 4), (0.9,), solver="heun")
  out = sampler.sample(
    _gaussian_velocity(mu, sd),
    noise,
    jnp.zeros(2, jnp.int32),
    cfg,
    null_label=10,
    decomposition=dec,
    previews=True,
  )
  assert out["previews"].shape == (2, 2, 8, 8, 1)
  np.testing.assert_allclose(out["previews"][-1], out["images"], atol=1e-5)
  np.testing.assert_allclose(out["images"], dec.merge(out["stages"]), atol=1e-6)
  # The first preview is the upsampled coarse estimate: no fine detail yet.
  p1 = out["previews"][0]
  np.testing.assert_allclose(p1[:, ::2, ::2], p1[:, 1::2, 1::2], atol=1e-6)
  assert float(jnp.abs(out["images"][:, ::2, ::2] - out["images"][:, 1::2, 1::2]).max()) > 1e-4


# -- per-stage guidance -------------------------------------------------------------------------

_SLOPES = (-0.7, -0.4, -0.2)


def _linear_velocity(inputs, t, labels, stage_index):
  """A tiny linear field with cross-stage coupling; conditional and null labels differ."""
  out = []
  cond = (labels != 10).astype(jnp.float32)
  for s, x in enumerate(inputs):
    other = sum(jnp.mean(y, axis=tuple(range(1, y.ndim))) for j, y in enumerate(inputs) if j != s)
    drift = 0.5 + s + 1.5 * cond + 0.3 * t[:, s] + 0.1 * other
    out.append(_SLOPES[s] * x + drift.reshape((-1,) + (1,) * (x.ndim - 1)))
  return tuple(out)


def _reference_sample(noise, labels, cfg):
  """Hand-rolled NumPy sampler: Python loops, guidance decided per stage and per evaluation."""
  times, phase = sampler.stage_schedule(cfg.steps_per_stage, cfg.thresholds)
  scales, intervals = cfg.stage_cfg_scales, cfg.stage_guidance_intervals
  num_stages, batch = len(noise), labels.shape[0]
  null = np.full_like(labels, 10)

  def field(x, t, stage, t_start):
    inputs = tuple(xs * (s <= stage) for s, xs in enumerate(x))
    tb = np.broadcast_to(t, (batch, num_stages))
    v_c = [np.asarray(v) for v in _linear_velocity(inputs, tb, labels, None)]
    v_u = [np.asarray(v) for v in _linear_velocity(inputs, tb, null, None)]
    out, doubled = [], False
    for s in range(num_stages):
      lo, hi = intervals[s]
      if s <= stage and t_start[s] < 1 and lo <= t[s] <= hi and scales[s] != 1.0:
        out.append(v_u[s] + scales[s] * (v_c[s] - v_u[s]))
        doubled = True
      else:
        out.append(v_c[s])
    return out, 2 if doubled else 1

  x = [np.asarray(n, np.float64) for n in noise]
  nfe = 0
  for k in range(len(phase)):
    t0, t1 = times[k], times[k + 1]
    v, n = field(x, t0, phase[k], t0)
    nfe += n
    last = k == len(phase) - 1
    if cfg.solver == "heun" and not (last and cfg.heun_final_euler):
      x_pred = [xs + (t1[s] - t0[s]) * vs for s, (xs, vs) in enumerate(zip(x, v))]
      v2, n2 = field(x_pred, t1, phase[k], t0)
      nfe += n2
      v = [(a + b) / 2 for a, b in zip(v, v2)]
    x = [xs + (t1[s] - t0[s]) * vs for s, (xs, vs) in enumerate(zip(x, v))]
  return x, nfe


def _noise3(batch=3):
  keys = jax.random.split(jax.random.key(5), 3)
  return tuple(jax.random.normal(k, (batch, n, n, 1)) for k, n in zip(keys, (2, 4, 8)))


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize(
  "scale,interval",
  [
    ((2.0, 1.0, 1.0), (0.0, 1.0)),
    ((1.0, 3.0, 1.0), (0.0, 1.0)),
    ((2.0, 0.5, 1.5), ((0.0, 0.6), (0.3, 1.0), (0.0, 0.5))),
    (2.5, ((0.2, 0.9), (0.0, 0.4), (0.5, 1.0))),
  ],
)
def test_per_stage_guidance_matches_a_hand_rolled_reference(solver, scale, interval):
  noise = _noise3()
  labels = jnp.array([1, 4, 7])
  cfg = sampler.SamplerConfig(
    (4, 3, 2), (0.5, 0.9), solver=solver, cfg_scale=scale, guidance_interval=interval
  )
  out = jax.jit(lambda n: sampler.sample(_linear_velocity, n, labels, cfg, null_label=10))(noise)
  ref, nfe = _reference_sample(noise, np.asarray(labels), cfg)
  for a, b in zip(out["stages"], ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert int(out["nfe"]) == nfe


def test_scale_for_one_stage_equals_guiding_only_that_stage():
  """(2, 1, 1) guides stage 1 and leaves stages 2 and 3 conditional-only (per the reference);
  the result differs both from no guidance and from guiding every stage."""
  noise = _noise3()
  labels = jnp.array([1, 4, 7])
  run = lambda **kw: sampler.sample(
    _linear_velocity,
    noise,
    labels,
    sampler.SamplerConfig((4, 3, 2), (0.5, 0.9), **kw),
    null_label=10,
  )["stages"]
  per_stage = run(cfg_scale=(2.0, 1.0, 1.0))
  everywhere, nowhere = run(cfg_scale=2.0), run(cfg_scale=1.0)
  ref, _ = _reference_sample(
    noise,
    np.asarray(labels),
    sampler.SamplerConfig((4, 3, 2), (0.5, 0.9), cfg_scale=(2.0, 1.0, 1.0)),
  )
  for a, b in zip(per_stage, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(per_stage[0] - nowhere[0]).max()) > 0.1
  assert float(jnp.abs(per_stage[2] - everywhere[2]).max()) > 0.1


def test_per_stage_scale_does_not_double_the_batch_after_the_guided_stage_finishes():
  calls = []
  cfg = sampler.SamplerConfig((4, 3, 2), (0.5, 0.9), cfg_scale=(2.0, 1.0, 1.0))
  run = jax.jit(
    lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg, null_label=10)
  )
  out = run(_noise3(), jnp.zeros(3, jnp.int32))
  jax.effects_barrier()
  # Stage 1 is unfinished during phases 1 and 2 (7 steps); phase 3 moves stages 2 and 3 only.
  assert calls == [6] * 7 + [3] * 2
  assert int(out["nfe"]) == 16
  calls.clear()
  cfg = sampler.SamplerConfig((4, 3, 2), (0.5, 0.9), cfg_scale=(1.0, 1.0, 4.0))
  out = jax.jit(
    lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg, null_label=10)
  )(_noise3(), jnp.zeros(3, jnp.int32))
  jax.effects_barrier()
  assert calls == [3] * 7 + [6] * 2  # only the last stage is guided, from its start
  assert int(out["nfe"]) == 11


def test_guidance_interval_per_stage_counts():
  calls = []
  # Stage 1 runs t = 0, .1, ..., .9 (phase 1: 0 -> 0.5 in 5 steps, phase 2: 0.5 -> 1 in 5);
  # stage 2 runs 0, .2, .4, .6, .8 in phase 2. Guide stage 1 for t <= 0.2, stage 2 for t >= 0.6.
  cfg = sampler.SamplerConfig(
    (5, 5), (0.5,), cfg_scale=2.0, guidance_interval=((0.0, 0.25), (0.55, 1.0))
  )
  out = jax.jit(
    lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg, null_label=10)
  )((jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 4, 4, 1))), jnp.zeros(1, jnp.int32))
  jax.effects_barrier()
  assert calls == [2, 2, 2, 1, 1, 1, 1, 1, 2, 2]
  assert int(out["nfe"]) == 15


@pytest.mark.parametrize(
  "final_euler,hi,passes",
  [
    (True, 1.0, 34),  # 17 passes (the last step is Euler), all guided
    (False, 1.0, 36),  # the final corrector at t = 1 still moves both stages: guided
    (False, 0.95, 35),  # ... unless t = 1 is outside the interval
  ],
)
def test_heun_guidance_accounting_on_the_last_step(final_euler, hi, passes):
  calls = []
  cfg = sampler.SamplerConfig(
    (6, 3),
    (0.8,),
    solver="heun",
    cfg_scale=2.0,
    guidance_interval=(0.0, hi),
    heun_final_euler=final_euler,
  )
  out = jax.jit(
    lambda n, l: sampler.sample(_counting_velocity(calls, _zero_velocity), n, l, cfg, null_label=10)
  )((jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 4, 4, 1))), jnp.zeros(1, jnp.int32))
  jax.effects_barrier()
  assert sum(calls) == passes and int(out["nfe"]) == passes


def test_per_stage_settings_forms_and_validation():
  cfg = sampler.SamplerConfig(
    (3, 2), (0.5,), cfg_scale=[2, 1], guidance_interval=[[0, 0.5], (0.1, 1)]
  )
  assert cfg.cfg_scale == (2.0, 1.0) and cfg.stage_cfg_scales == (2.0, 1.0)
  assert cfg.guidance_interval == ((0.0, 0.5), (0.1, 1.0)) and cfg.guided
  cfg = sampler.SamplerConfig((3, 2), (0.5,), cfg_scale=1.5, guidance_interval=(0.1, 0.9))
  assert cfg.cfg_scale == 1.5 and cfg.stage_cfg_scales == (1.5, 1.5)
  assert cfg.stage_guidance_intervals == ((0.1, 0.9), (0.1, 0.9))
  assert not sampler.SamplerConfig((3, 2), (0.5,), cfg_scale=(1, 1)).guided
  bad = [
    (dict(cfg_scale=(2.0, 1.0, 1.0)), "3 per-stage entries .* 2 stages"),
    (dict(cfg_scale=-1.0), "finite and >= 0"),
    (dict(cfg_scale=(2.0, -0.5)), "finite and >= 0"),
    (dict(cfg_scale=float("nan")), "finite and >= 0"),
    (dict(cfg_scale=(1.0, float("inf"))), "finite and >= 0"),
    (dict(cfg_scale="2"), "a number or a tuple"),
    (dict(guidance_interval=(0.6, 0.4)), "0 <= lo <= hi <= 1"),
    (dict(guidance_interval=(0.0, float("nan"))), "0 <= lo <= hi <= 1"),
    (dict(guidance_interval=((0.0, 1.0),)), "1 per-stage pairs, but the sampler has 2"),
    (dict(guidance_interval=((0.0, 1.0), (0.5, 1.2))), "of stage 2 must satisfy"),
    (dict(guidance_interval=(0.0, 0.5, 1.0)), "one \\(lo, hi\\) pair or one pair per stage"),
  ]
  for kw, match in bad:
    with pytest.raises(ValueError, match=match):
      sampler.SamplerConfig((3, 2), (0.5,), **kw)
