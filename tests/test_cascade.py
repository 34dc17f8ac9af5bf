"""The cascade baseline: conditioning tokens in the model, the phase from the step, the
conditioning noise levels, the low-resolution model fixed from the switch on (a snapshot of the
EMA, checkpointed), exact resume across the switch and a CLI run of both phases."""

import os
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax import dit, experiment
from dfm_jax.methods import cascade
from tests.train_utils import REPO, config_file, read_checkpoint

CONFIG = "configs/fashion_mnist.py:cascade,runlocal"


def load(arg: str = "cascade,runlocal", **extra):
  return config_file("fashion_mnist.py", arg, **extra)


def tiny_model_config(**kw) -> dit.DiTConfig:
  return dit.DiTConfig(
    stage_shapes=((8, 8, 1), (16, 16, 1)),
    patch_size=2,
    hidden_size=32,
    depth=1,
    num_heads=2,
    num_classes=10,
    **kw,
  )


def perturbed(model):
  """Every parameter plus noise drawn from its name (adaLN gates and heads start at zero, which
  would hide the inputs); equal names get equal noise in any model."""
  params = nnx.state(model, nnx.Param)

  def noisy(path, x):
    key = jax.random.key(zlib.crc32(jax.tree_util.keystr(path).encode()))
    return x + 0.05 * jax.random.normal(key, x.shape, x.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(noisy, params))
  return model


def call(model, cond=None, cond_t=None, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  stages = tuple(jax.random.normal(k, (2,) + s) for k, s in zip(keys, model.cfg.stage_shapes))
  t = jnp.asarray([[0.3, 0.6], [0.9, 0.1]])
  return model(stages, t, jnp.asarray([1, 10]), jnp.asarray([0, 1]), cond=cond, cond_t=cond_t)


def test_conditioning_tokens_change_only_the_stage_outputs_they_condition():
  model = perturbed(dit.DFMDiT(tiny_model_config(cond_image=True), rngs=nnx.Rngs(0)))
  cond = jax.random.normal(jax.random.key(5), (2, 16, 16, 1))
  plain = call(model)
  with_cond = call(model, cond, jnp.asarray([0.5, 0.9]))
  other_t = call(model, cond, jnp.asarray([0.1, 0.9]))
  for out, shape in zip(with_cond, model.cfg.stage_shapes):
    assert out.shape == (2,) + shape  # outputs for the stage tokens only
  for a, b in zip(plain, with_cond):
    assert not np.allclose(a, b), "the conditioning tokens did not reach the output"
  assert not np.allclose(with_cond[1][0], other_t[1][0])  # its t is embedded
  np.testing.assert_allclose(with_cond[1][1], other_t[1][1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="does not match the finest stage"):
    call(model, cond[:, :8, :8], jnp.asarray([0.5, 0.9]))


def test_default_model_is_unchanged_without_the_option():
  plain = perturbed(dit.DFMDiT(tiny_model_config(), rngs=nnx.Rngs(0)))
  cond = perturbed(dit.DFMDiT(tiny_model_config(cond_image=True), rngs=nnx.Rngs(0)))
  a = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  b = nnx.to_pure_dict(nnx.state(cond, nnx.Param))
  assert set(b) - set(a) == {"cond_embedder", "cond_time_embedder"}
  jax.tree.map(np.testing.assert_array_equal, a, {k: b[k] for k in a})
  for x, y in zip(call(plain), call(cond)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="takes no conditioning image"):
    call(plain, jnp.zeros((2, 16, 16, 1)), jnp.ones((2,)))


def test_phase_follows_the_step():
  opts = experiment.from_config(load(), check_data=False).method_options
  assert opts.switch_step == round(0.8 * 6) == 5
  assert [int(cascade.phase(s, opts.switch_step)) for s in range(6)] == [0, 0, 0, 0, 0, 1]
  assert cascade.switch_step(0.8, 4000) == 3200


def test_bad_settings_get_one_message_each():
  bad = load(
    cascade__low_res_fraction=0.05,
    decomposition__standardize=True,
    decomposition__kind="dwt",
    flow__final_stage_probs=(0.5, 0.5),
    flow__stage_weights=(1.0, 2.0),
  )
  with pytest.raises(ValueError) as e:
    experiment.from_config(bad, check_data=False)
  msg = str(e.value)
  for needle in (
    "leaves no step",
    "decomposition.standardize=False",
    "decomposition.kind must be",
    "flow.final_stage_probs would be ignored",
    "flow.stage_weights would be ignored",
  ):
    assert msg.count(needle) == 1, (needle, msg)
  with pytest.raises(ValueError) as e:  # ranges: the schema, before the method's own checks
    experiment.from_config(load(cascade__cond_scale=0.0, cascade__sample_noise=1.0))
  assert str(e.value).splitlines()[1:] == [
    "  - cascade.cond_scale must be > 0, got 0.0",
    "  - cascade.sample_noise must be in [0, 1), got 1.0",
  ]
  with pytest.raises(ValueError, match="are alternatives"):
    load("fm,cascade")


class Recorder:
  """A stand-in model that records the conditioning it is given and predicts zero."""

  def __init__(self, stage_shapes):
    self.shapes = stage_shapes
    self.seen = []

  def loss_weights(self, t):
    return jnp.ones_like(t)

  def __call__(self, stages, t, labels, stage_index, cond=None, cond_t=None):
    if cond is not None:
      jax.debug.callback(lambda *a: self.seen.append(a), cond, cond_t, stage_index)
    return tuple(jnp.zeros_like(s) for s in stages)


def test_conditioning_noise_levels_in_training_and_sampling():
  exp = experiment.from_config(load(batch_size=4096), check_data=False)
  method = exp.method
  rec = Recorder(exp.model.stage_shapes)
  data = jnp.full((4096, 32, 32, 1), 0.5)  # up(down(data)) = 0.5 everywhere
  labels = jnp.zeros((4096,), jnp.int32)
  loss = jax.jit(lambda step: method.loss(rec, jax.random.key(0), data, labels, step=step))
  loss(jnp.int32(4))
  jax.block_until_ready(loss(jnp.int32(4)))
  assert not rec.seen, "the low-resolution phase used the conditioning"
  jax.block_until_ready(loss(jnp.int32(5)))
  cond, t_c, stage_index = (np.asarray(a) for a in rec.seen[0])
  assert (stage_index == 1).all()
  logit = np.log(t_c / (1 - t_c))
  assert abs(logit.mean() - 1.5) < 0.05 and abs(logit.std() - 1.0) < 0.05
  eps = (cond - t_c[:, None, None, None] * 0.5) / (1 - t_c[:, None, None, None])
  assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1.0) < 0.01

  rec.seen.clear()
  out = method.sample((rec, rec), jax.random.key(1), labels[:3], exp.sampler, previews=True)
  assert out["images"].shape == (3, 32, 32, 1) and out["previews"].shape == (2, 3, 32, 32, 1)
  assert int(out["nfe"]) == sum(exp.sampler.steps_per_stage)
  _, t_c, _ = (np.asarray(a) for a in rec.seen[0])
  np.testing.assert_allclose(t_c, 1 - 0.025)


def test_phase_one_leaves_the_full_resolution_layers_alone():
  exp = experiment.from_config(load(flow__label_dropout=0.0), check_data=False)
  model = perturbed(dit.DFMDiT(exp.model, rngs=nnx.Rngs(0)))
  data = jax.random.normal(jax.random.key(0), (4, 32, 32, 1))
  labels = jnp.arange(4)

  def grads(step):
    fn = lambda m: exp.method.loss(m, jax.random.key(1), data, labels, step=step)
    return nnx.to_pure_dict(nnx.grad(lambda m: fn(m)[0])(model))

  def norm(tree):
    return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))

  low, full = grads(jnp.int32(0)), grads(jnp.int32(5))
  for name in ("cond_embedder", "cond_time_embedder"):
    assert norm(low[name]) == 0 and norm(full[name]) > 0, name
  assert norm(low["heads"][1]) == 0 and norm(full["heads"][0]) == 0
  assert norm(low["blocks"]) > 0 and norm(full["blocks"]) > 0


def flat(state) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def assert_equal(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def trained():
  """A runlocal cascade (switch at step 5) trained for 8 steps on random batches: its run and the
  train states after 5 (the switch) and 8 steps, each with the snapshot and EMA after every step."""
  from dfm_jax import run as run_lib, sharding, train  # pylint: disable=g-import-not-at-top

  run = run_lib.setup(load(), None, jax.devices()[:1], check_data=False)
  assert run.exp.method_options.switch_step == 5
  compiled = train.compile_step(
    run, {"image": ((8, 32, 32, 1), np.float32), "label": ((8,), np.int32)}
  )
  state, kept, history = run_lib.init_state(run), {}, []
  rng = np.random.default_rng(0)
  for done in range(1, 9):
    batch = {
      "image": rng.uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32),
      "label": rng.integers(0, 10, (8,)).astype(np.int32),
    }
    state, _ = compiled(state, sharding.global_batch(batch, run.mesh))
    history.append((flat(state["snapshot"]), flat(state["ema"])))
    if done in (5, 8):
      kept[done] = jax.tree.map(jnp.copy, state)  # the next step donates ``state``
  return run, kept, history


def test_the_snapshot_follows_the_ema_until_the_switch_then_stays(trained):
  _, _, history = trained
  for snapshot, ema in history[:5]:  # the low-resolution steps 0-4
    assert_equal(snapshot, ema)
  at_switch = history[4][1]
  for snapshot, ema in history[5:]:  # full-resolution steps: the EMA moves on, the snapshot not
    assert_equal(snapshot, at_switch)
    assert any(not np.array_equal(ema[k], at_switch[k]) for k in ema)


def test_full_resolution_training_leaves_the_low_resolution_samples_alone(trained):
  from dfm_jax import sampling  # pylint: disable=g-import-not-at-top

  run, kept, _ = trained
  method = run.exp.method
  sample_fn = sampling.make_sample_fn(run.ema_graphdef(), run.exp, previews=True)
  key, labels = jax.random.key(3), jnp.arange(4)
  switch, later = (sample_fn(method.sampling_state(kept[s]), key, labels) for s in (5, 8))
  at_switch_ema = kept[5]["ema"]
  reference = sample_fn((at_switch_ema, at_switch_ema), key, labels)
  # previews[0]: the upsampled low-resolution sample
  np.testing.assert_array_equal(later["previews"][0], switch["previews"][0])
  np.testing.assert_array_equal(later["previews"][0], reference["previews"][0])
  assert not np.array_equal(later["images"], switch["images"])  # the full-resolution model trains
  with pytest.raises(TypeError, match="two models"):
    method.sample(nnx.merge(run.ema_graphdef(), at_switch_ema), key, labels, run.exp.sampler)


def test_the_snapshot_is_saved_and_restored(trained, tmp_path):
  from dfm_jax import checkpoint  # pylint: disable=g-import-not-at-top

  run, kept, _ = trained
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  try:
    ckpt.save(8, kept[8])
    restored = ckpt.restore(8, run.abstract_state)
  finally:
    ckpt.close()
  assert_equal(flat(restored), flat(kept[8]))
  assert_equal(flat(restored["snapshot"]), flat(kept[5]["ema"]))


def test_only_the_cascade_keeps_a_snapshot():
  from dfm_jax import run as run_lib  # pylint: disable=g-import-not-at-top

  for arg, has in (("runlocal", False), ("fm,runlocal", False), ("cascade,runlocal", True)):
    run = run_lib.setup(load(arg), None, jax.devices()[:1], check_data=False)
    assert ("snapshot" in nnx.to_pure_dict(run.abstract_state)) == has, arg


@pytest.mark.integration
def test_resume_across_the_switch_is_exact(tmp_path):
  """Checkpoints every step, switch after step 3 of 6: resuming from the checkpoint before the
  switch and from the one at it ends bitwise equal to the uninterrupted run."""
  from dfm_jax import train  # pylint: disable=g-import-not-at-top

  config = load(cascade__low_res_fraction=0.5, checkpoint_every=1)
  reference = str(tmp_path / "reference")
  train.train(config, reference, devices=jax.devices()[:1])
  want = read_checkpoint(reference, 6)
  for stop in (2, 3):
    workdir = str(tmp_path / f"stop{stop}")
    shutil.copytree(reference, workdir)
    for step in range(stop + 1, 7):
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    train.train(config, workdir, devices=jax.devices()[:1])
    got = read_checkpoint(workdir, 6)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"stop {stop}: {key}")


@pytest.mark.integration
def test_cli_trains_both_phases_checkpoints_and_samples(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from tests.train_utils import env  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")

  def main(*args):
    cmd = [sys.executable, "-m", "dfm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}"]
    proc = subprocess.run(
      cmd + list(args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

  # 10 steps: 8 low-resolution, then 2 full-resolution (the first moves only the zero-initialised
  # head, the second also what feeds it); checkpoints every 2 steps.
  main("--config.total_steps=10")
  ckpt = {s: read_checkpoint(workdir, s) for s in (2, 8, 10)}
  cond = [k for k in ckpt[10] if k.startswith("/model/cond_embedder")]
  shared = [k for k in ckpt[10] if k.startswith("/model/blocks")]
  assert cond and shared
  for k in cond:  # no weight decay here: phase 1 leaves the conditioning layer exactly as is
    np.testing.assert_array_equal(ckpt[2][k], ckpt[8][k], err_msg=k)
  assert any(not np.array_equal(ckpt[8][k], ckpt[10][k]) for k in cond)
  assert any(not np.array_equal(ckpt[2][k], ckpt[8][k]) for k in shared)
  # the low-resolution model: the EMA until the switch, then fixed
  ema = [k for k in ckpt[10] if k.startswith("/ema/")]
  assert ema and all(k.replace("/ema/", "/snapshot/", 1) in ckpt[10] for k in ema)
  for k in ema:
    snap = k.replace("/ema/", "/snapshot/", 1)
    np.testing.assert_array_equal(ckpt[8][snap], ckpt[8][k], err_msg=k)
    np.testing.assert_array_equal(ckpt[10][snap], ckpt[8][k], err_msg=k)
  assert any(not np.array_equal(ckpt[8][k], ckpt[10][k]) for k in ema)
  main("--config.total_steps=10", "--mode=sample", "--config.sampler.num_samples=6")
  data = np.load(os.path.join(workdir, "samples", "final_step10.npz"))
  assert data["images"].shape == (6, 32, 32, 1) and data["images"].dtype == np.uint8
