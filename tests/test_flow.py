"""The training objective: Algorithm 1's statistics, masking, and S = 1 = plain flow matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from dfm_jax import experiment, flow

from tests.train_utils import config_file


def _logit_normal_cdf(loc, scale):
  return lambda x: stats.norm.cdf((special.logit(np.clip(x, 1e-12, 1 - 1e-12)) - loc) / scale)


@pytest.mark.parametrize("per_sample", [True, False])
def test_main_stage_frequencies_match_p_q(per_sample):
  cfg = flow.FlowConfig(stage_probs=(0.6, 0.3, 0.1), per_sample_stage=per_sample)
  if per_sample:
    q, _ = flow.sample_stage_times(jax.random.key(0), 30000, cfg)
    q = np.asarray(q)
  else:
    draws = jax.vmap(lambda k: flow.sample_stage_times(k, 8, cfg)[0])(
      jax.random.split(jax.random.key(0), 4000)
    )
    draws = np.asarray(draws)
    assert (draws == draws[:, :1]).all(), "per-batch Q must be shared by the whole batch"
    q = draws[:, 0]
  freq = np.bincount(q, minlength=3) / len(q)
  se = np.sqrt(np.array([0.6, 0.3, 0.1]) * (1 - np.array([0.6, 0.3, 0.1])) / len(q))
  np.testing.assert_array_less(np.abs(freq - [0.6, 0.3, 0.1]), 4 * se)


def test_timestep_marginals_are_logit_normal_and_later_stages_zero():
  cfg = flow.FlowConfig(
    stage_probs=(0.5, 0.5), main_loc=0.3, main_scale=0.8, early_loc=1.5, early_scale=1.2
  )
  q, t = flow.sample_stage_times(jax.random.key(1), 20000, cfg)
  q, t = np.asarray(q), np.asarray(t)
  main_t = t[np.arange(len(q)), q]
  assert stats.kstest(main_t, _logit_normal_cdf(0.3, 0.8)).pvalue > 1e-3
  early = t[q == 1, 0]
  assert stats.kstest(early, _logit_normal_cdf(1.5, 1.2)).pvalue > 1e-3
  # A wrong location is rejected, so the test has power.
  assert stats.kstest(early, _logit_normal_cdf(0.0, 1.2)).pvalue < 1e-6
  assert (t[q == 0, 1] == 0.0).all()


def test_later_stages_are_zeroed_and_masked():
  cfg = flow.FlowConfig(stage_probs=(1.0, 0.0, 0.0))  # main stage always the coarsest
  stages = (jnp.ones((4, 2, 2, 1)), jnp.ones((4, 4, 4, 1)), jnp.ones((4, 8, 8, 1)))
  seen = {}

  def velocity_fn(inputs, t, labels, stage_index):
    seen["inputs"], seen["t"], seen["stage"] = inputs, t, stage_index
    # Garbage predictions on later stages must not change the loss.
    return (inputs[0] * 0, inputs[1] + 1e3, inputs[2] - 1e3)

  loss, metrics = flow.dfm_training_loss(
    velocity_fn, jax.random.key(0), stages, jnp.zeros(4, jnp.int32), cfg, null_label=10
  )
  assert float(jnp.abs(seen["inputs"][1]).max()) == 0.0
  assert float(jnp.abs(seen["inputs"][2]).max()) == 0.0
  assert (np.asarray(seen["t"])[:, 1:] == 0.0).all()
  assert (np.asarray(seen["stage"]) == 0).all()
  assert float(metrics["loss_stage2"]) == 0.0 and float(metrics["loss_stage3"]) == 0.0
  assert np.isfinite(float(loss)) and float(loss) < 100.0


def test_single_stage_equals_plain_flow_matching_on_the_same_draws():
  """Recover the draws the loss used, then evaluate an independent flow-matching loss."""
  cfg = flow.FlowConfig(stage_probs=(1.0,), label_dropout=0.0)
  x1 = jax.random.normal(jax.random.key(7), (64, 4, 4, 3))
  labels = jnp.arange(64) % 10
  w = jax.random.normal(jax.random.key(8), (3, 3)) * 0.3
  record = {}

  def model(x, t):  # any deterministic function of (x_t, t)
    return jnp.tanh(x @ w) * t[:, None, None, None] - x

  def velocity_fn(inputs, t, labels_in, stage_index):
    record["xt"], record["t"], record["labels"] = inputs[0], t[:, 0], labels_in
    return (model(inputs[0], t[:, 0]),)

  loss, _ = flow.dfm_training_loss(
    velocity_fn, jax.random.key(9), (x1,), labels, cfg, null_label=10
  )
  xt, t = record["xt"], record["t"]
  tb = t[:, None, None, None]
  x0 = (xt - tb * x1) / (1 - tb)
  # Plain flow matching: x_t = t x1 + (1 - t) x0, v = x1 - x0, mean squared error.
  reference = jnp.mean((model(tb * x1 + (1 - tb) * x0, t) - (x1 - x0)) ** 2)
  np.testing.assert_allclose(float(loss), float(reference), rtol=1e-5)
  np.testing.assert_array_equal(record["labels"], labels)
  # The noise really is standard normal and t logit-normal(0, 1).
  assert abs(float(x0.mean())) < 0.1 and abs(float(x0.std()) - 1) < 0.1
  assert stats.kstest(np.asarray(t), _logit_normal_cdf(0.0, 1.0)).pvalue > 1e-3


def test_loss_reduction_and_stage_weights():
  """Per-stage element mean, weighted sum over active stages, batch mean."""
  pred = (jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1)))
  targets = (jnp.full((2, 2, 2, 1), 1.0), jnp.full((2, 4, 4, 1), 2.0))
  active = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  loss, metrics = flow.masked_stage_loss(pred, targets, active, stage_weights=(1.0, 0.5))
  # sample 0: 1; sample 1: 1 + 0.5 * 4 = 3 -> mean 2
  np.testing.assert_allclose(float(loss), 2.0)
  np.testing.assert_allclose(float(metrics["loss_stage2"]), 4.0)
  np.testing.assert_allclose(float(metrics["frac_main_stage1"]), 0.5)


def test_label_dropout_rate():
  cfg = flow.FlowConfig(label_dropout=0.1)
  record = {}

  def velocity_fn(inputs, t, labels, stage_index):
    record["labels"] = labels
    return inputs

  flow.dfm_training_loss(
    velocity_fn,
    jax.random.key(0),
    (jnp.zeros((20000, 1, 1, 1)),),
    jnp.zeros(20000, jnp.int32),
    cfg,
    null_label=10,
  )
  rate = float((record["labels"] == 10).mean())
  assert abs(rate - 0.1) < 0.01


def test_bad_stage_probs():
  with pytest.raises(ValueError, match="probability distribution"):
    flow.FlowConfig(stage_probs=(0.9, 0.2))
  with pytest.raises(ValueError, match="probability distribution"):
    flow.FlowConfig(stage_probs=(1.2, -0.2))


def test_per_sample_loss_weights():
  """``sample_weights [B, S]`` multiply each stage's element-mean error; masks still apply."""
  pred = (jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1)))
  targets = (jnp.full((2, 2, 2, 1), 1.0), jnp.full((2, 4, 4, 1), 2.0))
  active = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  weights = jnp.array([[2.0, 100.0], [3.0, 0.5]])
  loss, metrics = flow.masked_stage_loss(
    pred, targets, active, stage_weights=(1.0, 0.5), sample_weights=weights
  )
  # sample 0: 2 * 1 (stage 2 masked); sample 1: 3 * 1 + 0.5 * 0.5 * 4 = 4 -> mean 3
  np.testing.assert_allclose(float(loss), 3.0)
  np.testing.assert_allclose(float(metrics["loss_stage1"]), 2.5)
  np.testing.assert_allclose(float(metrics["loss_stage2"]), 2.0)
  np.testing.assert_allclose(float(metrics["mse_stage2"]), 4.0)


def test_loss_weight_fn_sees_the_drawn_times():
  cfg = flow.FlowConfig(stage_probs=(0.5, 0.5))
  stages = (jnp.ones((8, 2, 2, 1)), jnp.ones((8, 4, 4, 1)))
  seen = {}

  def velocity_fn(inputs, t, labels, stage_index):
    seen["t"] = t
    return tuple(jnp.zeros_like(x) for x in inputs)

  def weight_fn(t):
    seen["wt"] = t
    return 1.0 + t

  args = (velocity_fn, jax.random.key(0), stages, jnp.zeros(8, jnp.int32), cfg)
  weighted, _ = flow.dfm_training_loss(*args, null_label=10, loss_weight_fn=weight_fn)
  plain, _ = flow.dfm_training_loss(*args, null_label=10)
  np.testing.assert_array_equal(seen["t"], seen["wt"])
  assert float(weighted) > float(plain)


def test_p_q_schedule_moves_linearly_from_start_to_final_probs():
  cfg = flow.FlowConfig(stage_probs=(0.9, 0.1), final_stage_probs=(0.5, 0.5), schedule_steps=1000)
  n = 40000
  for step, p_fine in ((0, 0.1), (500, 0.3), (1000, 0.5), (5000, 0.5)):
    q, _ = flow.sample_stage_times(jax.random.key(step), n, cfg, step=jnp.int32(step))
    freq = float(np.mean(np.asarray(q) == 1))
    assert abs(freq - p_fine) < 4 * np.sqrt(p_fine * (1 - p_fine) / n), (step, freq)
  # Without a step (sampling-time callers) or without a schedule, p_q is stage_probs.
  np.testing.assert_allclose(flow.stage_probs_at(cfg), [0.9, 0.1])
  plain = flow.FlowConfig(stage_probs=(0.9, 0.1))
  np.testing.assert_allclose(flow.stage_probs_at(plain, 700), [0.9, 0.1])


def test_p_q_schedule_is_checked():
  with pytest.raises(ValueError, match="final_stage_probs has 3 entries for 2 stages"):
    flow.FlowConfig(stage_probs=(0.9, 0.1), final_stage_probs=(0.5, 0.3, 0.2), schedule_steps=9)
  with pytest.raises(
    ValueError, match="final_stage_probs .p_q. must be a probability distribution"
  ):
    flow.FlowConfig(stage_probs=(0.9, 0.1), final_stage_probs=(0.5, 0.6), schedule_steps=9)
  with pytest.raises(ValueError, match="schedule_steps >= 1"):
    flow.FlowConfig(stage_probs=(0.9, 0.1), final_stage_probs=(0.5, 0.5))


def test_config_p_q_schedule_reaches_the_dfm_loss_through_the_train_step_counter():
  c = config_file(
    "default.py",
    "runlocal",
    flow__stage_probs=(1.0, 0.0, 0.0),
    flow__final_stage_probs=(0.0, 0.0, 1.0),
    total_steps=100,
    flow__label_dropout=0.0,
  )
  exp = experiment.from_config(c, check_data=False)
  zeros = lambda stages, t, labels, stage_index: tuple(jnp.zeros_like(s) for s in stages)
  r, ch = c.data.resolution, c.data.channels
  data, labels = jnp.zeros((256, r, r, ch)), jnp.zeros((256,), jnp.int32)
  fn = jax.jit(lambda step: exp.method.loss(zeros, jax.random.key(0), data, labels, step=step))
  assert float(fn(jnp.int32(0))[1]["frac_main_stage1"]) == 1.0
  assert float(fn(jnp.int32(100))[1]["frac_main_stage3"]) == 1.0
  middle = fn(jnp.int32(50))[1]
  assert 0.35 < float(middle["frac_main_stage1"]) < 0.65
  assert 0.35 < float(middle["frac_main_stage3"]) < 0.65
