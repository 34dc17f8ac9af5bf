"""Pyramidal Flow: closed forms, shared and block noise, the jump matching the next window's
training start point in distribution, the training target, the sampler, config checks, the CLI."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm_jax import experiment, flow
from dfm_jax.methods import METHODS
from dfm_jax.methods import pyramidal_flow as pf
from dfm_jax.sampler import SamplerConfig
from tests.train_utils import config_file


def _method(stage_shapes, probs=None, null_label=10, final_probs=None, schedule_steps=0):
  k = len(stage_shapes)
  flow_cfg = flow.FlowConfig(
    stage_probs=probs or (1.0 / k,) * k,
    final_stage_probs=final_probs,
    schedule_steps=schedule_steps,
    label_dropout=0.0,
  )
  exp = types.SimpleNamespace(
    model=types.SimpleNamespace(stage_shapes=tuple(stage_shapes)),
    flow=flow_cfg,
    null_label=null_label,
  )
  return METHODS.get("pyramidal_flow")(exp)


def _np_down(x):  # mean of each 2x2 block of [B, H, W, C]
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _np_up(x):  # nearest x2
  return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)


def test_window_sigmas_and_jumps_match_the_spec_for_three_windows():
  start, end = pf.window_sigmas(3)
  np.testing.assert_allclose(start, [1.0, 0.80024, 0.50075], atol=1e-5)
  np.testing.assert_allclose(end, [0.667, 0.334, 0.0], atol=1e-12)
  (a1, b1), (a2, b2) = pf.jump_coefficients(3)
  np.testing.assert_allclose([a1, b1, a2, b2], [0.5999, 0.6930, 0.7496, 0.4337], atol=1e-4)
  np.testing.assert_allclose(pf.window_times(3), [0.0, 0.333, 0.666, 1.0])
  # The jump lands exactly on the next start: alpha (1 - E) = 1 - S, alpha^2 E^2 (1 + 1/g) = S^2.
  for k, (a, b) in enumerate(pf.jump_coefficients(3), start=1):
    assert abs(a * (1 - end[k - 1]) - (1 - start[k])) < 1e-12
    assert abs(b**2 * (1 + pf.GAMMA) - start[k] ** 2) < 1e-12
    assert abs(b**2 * pf.GAMMA - (a * end[k - 1]) ** 2) < 1e-12


def test_shared_noise_has_unit_variance_on_every_level():
  levels = pf.shared_noise(jax.random.key(0), (64, 32, 32, 2), 3)
  assert [lv.shape[1] for lv in levels] == [8, 16, 32]
  for lv in levels:
    assert abs(float(lv.std()) - 1.0) < 0.02 and abs(float(lv.mean())) < 0.02
  for lo, hi in zip(levels[:-1], levels[1:]):
    np.testing.assert_allclose(lo, 2.0 * _np_down(np.asarray(hi)), atol=1e-5)


def test_block_noise_covariance_inside_and_between_blocks():
  eps = np.asarray(jax.jit(pf.block_noise, static_argnums=1)(jax.random.key(1), (4000, 4, 4, 1)))
  blocks = eps.reshape(4000, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)
  want = (1 + pf.GAMMA) * np.eye(4) - pf.GAMMA * np.ones((4, 4))
  np.testing.assert_allclose(np.cov(blocks.T), want, atol=0.04)
  across = np.mean(eps[:, :, 1] * eps[:, :, 2])  # horizontal neighbours in different blocks
  assert abs(across) < 0.03
  video = pf.block_noise(jax.random.key(2), (2, 3, 4, 6, 5))
  assert video.shape == (2, 3, 4, 6, 5)


def _block_stats(x):
  """Per-pixel mean and std over samples, and the mean correlation of each within-block pair
  type (horizontal, vertical, diagonal) and of horizontal neighbours across blocks."""
  x = np.asarray(x, np.float64)[..., 0]
  mean, std = x.mean(0), x.std(0)
  z = (x - mean) / std

  def corr(a, b):
    return float(np.mean(a * b))

  return (
    mean,
    std,
    {
      "h": corr(z[:, :, 0::2], z[:, :, 1::2]),
      "v": corr(z[:, 0::2], z[:, 1::2]),
      "d": corr(z[:, 0::2, 0::2], z[:, 1::2, 1::2]),
      "across": corr(z[:, :, 1:-1:2], z[:, :, 2::2]),
    },
  )


@pytest.mark.parametrize("k", [1, 2])
def test_state_after_a_jump_has_the_statistics_of_the_next_training_start(k):
  """Sampling from the exact end state of window k - 1 (a fixed clean image, fresh shared noise)
  and jumping gives the training start point of window k: same per-pixel mean and std (S_k),
  no correlation inside 2x2 blocks or across them."""
  n = 6000
  method = _method([(4, 4, 1), (8, 8, 1), (16, 16, 1)])
  start_s, end_s = pf.window_sigmas(3)
  image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 1)), jnp.float32)

  @jax.jit
  def draw(key):
    clean = tuple(jnp.broadcast_to(c, (n,) + c.shape[1:]) for c in pf.gaussian_pyramid(image, 3))
    k_train, k_end, k_jump = jax.random.split(key, 3)
    noise = pf.shared_noise(k_train, (n, 16, 16, 1), 3)
    train_start, _ = pf.window_points(clean, noise, k, start_s[k], end_s[k])
    noise_prev = pf.shared_noise(k_end, (n, 16, 16, 1), 3)
    _, end_prev = pf.window_points(clean, noise_prev, k - 1, start_s[k - 1], end_s[k - 1])
    # Control: without the block noise's negative correlation the upsampled noise stays
    # correlated inside blocks, which the statistics below detect.
    alpha, beta = pf.jump_coefficients(3)[k - 1]
    up = pf.nearest_up(end_prev)
    naive = alpha * up + beta * jax.random.normal(k_jump, up.shape)
    return train_start, method.jump(k_jump, end_prev, k), naive

  train_start, jumped, naive = draw(jax.random.key(k))
  assert jumped.shape == train_start.shape
  m_s, s_s, c_s = _block_stats(jumped)
  m_t, s_t, c_t = _block_stats(train_start)
  np.testing.assert_allclose(m_s, m_t, atol=0.06)
  np.testing.assert_allclose(s_s, s_t, atol=0.06)
  assert abs(s_s.mean() - start_s[k]) < 0.01 and abs(s_t.mean() - start_s[k]) < 0.01
  for name in c_t:
    assert abs(c_s[name] - c_t[name]) < 0.02, (name, c_s, c_t)
    assert abs(c_s[name]) < 0.02, (name, c_s)
  assert _block_stats(naive)[2]["h"] > 0.2


def test_training_target_is_end_minus_start_against_numpy():
  """The loss of a fixed prediction P equals, in numpy, the mean over samples of
  mean((P - (end - start))^2) at each sample's window, with the noise recovered from the model
  input; levels other than the sample's window get zero input and t = 0."""
  shapes = [(4, 4, 1), (8, 8, 1), (16, 16, 1)]
  method = _method(shapes)
  batch = 32
  rng = np.random.default_rng(3)
  data = rng.uniform(-1, 1, (batch, 16, 16, 1)).astype(np.float32)
  preds = [rng.normal(size=(batch,) + s).astype(np.float32) for s in shapes]
  seen = {}

  def model(inputs, t, labels, stage_index):
    seen.update(inputs=list(inputs), t=t, labels=labels, stage=stage_index)
    return tuple(jnp.asarray(p) for p in preds)

  labels = jnp.arange(batch) % 10

  @jax.jit
  def run(key):
    loss, metrics = method.loss(model, key, jnp.asarray(data), labels)
    return loss, metrics, dict(seen)

  loss, metrics, seen = run(jax.random.key(4))
  seen = {name: jax.tree.map(np.asarray, v) for name, v in seen.items()}
  np.testing.assert_array_equal(seen["labels"], np.asarray(labels))
  clean = [_np_down(_np_down(data)), _np_down(data), data]
  start_s = [1.0, 0.80024, 0.50075]
  end_s = [0.667, 0.334, 0.0]
  bounds = [0.0, 0.333, 0.666, 1.0]
  want = []
  for b in range(batch):
    k = int(seen["stage"][b])
    assert (seen["t"][b, np.arange(3) != k] == 0).all()
    for s in range(3):
      if s != k:
        assert not seen["inputs"][s][b].any()
    t = seen["t"][b, k]
    assert bounds[k] <= t <= bounds[k + 1] + 1e-6
    r = (bounds[k + 1] - t) / (bounds[k + 1] - bounds[k])
    x = seen["inputs"][k][b].astype(np.float64)
    up = _np_up(clean[k - 1][b : b + 1])[0] if k else 0.0
    s0, e0 = start_s[k], end_s[k]
    noise = (x - r * (1 - s0) * up - (1 - r) * (1 - e0) * clean[k][b]) / (r * s0 + (1 - r) * e0)
    assert abs(noise.std() - 1.0) < 0.6  # a noise draw, not a rescaled image
    start = s0 * noise + (1 - s0) * up
    end = e0 * noise + (1 - e0) * clean[k][b]
    want.append(np.mean((preds[k][b] - (end - start)) ** 2))
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=2e-4)
  assert len(set(seen["stage"].tolist())) == 3
  assert abs(sum(float(metrics[f"frac_main_stage{s}"]) for s in (1, 2, 3)) - 1.0) < 1e-6


def test_window_shares_follow_a_stage_probs_schedule():
  """``flow.final_stage_probs`` moves the windows' shares from p_q at step 0 to the final p_q
  at ``schedule_steps`` (linear, then constant), as it does DFM's main stage."""
  shapes = [(4, 4, 1), (8, 8, 1)]
  method = _method(shapes, probs=(0.9, 0.1), final_probs=(0.2, 0.8), schedule_steps=100)
  draw = jax.jit(lambda key, step: method._window(key, 20000, step))
  for step, want in ((0, 0.1), (50, 0.45), (100, 0.8), (400, 0.8)):
    share = float(np.mean(np.asarray(draw(jax.random.key(step), step)) == 1))
    assert abs(share - want) < 0.015, (step, share, want)


def test_sampler_shapes_nfe_guidance_and_previews():
  shapes = [(4, 4, 1), (8, 8, 1)]
  method = _method(shapes)

  def model(inputs, t, labels, stage_index):
    return tuple(-0.5 * x for x in inputs)

  labels = jnp.arange(3)
  plain = SamplerConfig((3, 2), (0.5,))
  out = jax.jit(lambda key: method.sample(model, key, labels, plain, True))(jax.random.key(0))
  assert out["images"].shape == (3, 8, 8, 1)
  assert out["previews"].shape == (2, 3, 8, 8, 1)
  assert int(out["nfe"]) == 5
  guided = SamplerConfig((3, 2), (0.5,), cfg_scale=(2.0, 1.0))
  out = jax.jit(lambda key: method.sample(model, key, labels, guided))(jax.random.key(0))
  assert int(out["nfe"]) == 2 * 3 + 2
  assert np.isfinite(np.asarray(out["images"])).all()


def _fmnist(**overrides):
  fields = {k.replace(".", "__"): v for k, v in overrides.items()}
  return config_file("fashion_mnist.py", "pyramidal,runlocal", **fields)


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"model.precondition": True}, "set model.precondition=False"),
    ({"decomposition.standardize": True}, "set decomposition.standardize=False"),
    ({"decomposition.kind": "dwt"}, "decomposition.kind 'laplacian', got 'dwt'"),
    ({"sampler.solver": "heun"}, "set sampler.solver='euler'"),
    ({"sampler.thresholds": (0.7,)}, "sampler.thresholds must be their ends (0.5,)"),
    ({"data.resolution": 30}, "cannot be split into 2 stages"),
  ],
)
def test_bad_settings_give_one_clear_message_each(overrides, message):
  with pytest.raises(ValueError) as err:
    experiment.from_config(_fmnist(**overrides), num_devices=1, check_data=False)
  text = str(err.value)
  assert text.count(message) == 1, text
  assert text.count("\n  - ") == 1, text


def test_level_gaps_and_halve_time_are_refused():
  c = _fmnist(**{"decomposition.level_gaps": (2,), "decomposition.halve_time": True})
  problems = METHODS.get("pyramidal_flow").check_config(c)
  assert len(problems) == 2
  assert "level_gaps" in problems[0] and "halve_time" in problems[1]


@pytest.mark.integration
def test_cli_trains_checkpoints_and_samples(tmp_path):
  from tests.train_utils import REPO, env  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path)
  cmd = [
    sys.executable,
    "-m",
    "dfm_jax.main",
    "--config=configs/fashion_mnist.py:pyramidal,runlocal",
    f"--workdir={workdir}",
  ]
  for extra in ([], ["--mode=sample"]):
    proc = subprocess.run(
      cmd + extra, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
  data = np.load(os.path.join(workdir, "samples", "final_step6.npz"))
  assert data["images"].shape == (12, 32, 32, 1)
  assert np.isfinite(data["images"].astype(np.float32)).all()
