"""config.init_from: a run starts from another run's EMA weights (plain fine-tuning, or a
single-stage flow-matching model fine-tuned into DFM, paper section 4.5)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax import checkpoint, init_from, run as run_lib, train
from tests.train_utils import REPO, config_file, env, read_checkpoint


CONFIG = "configs/fashion_mnist.py"


def config(variant="runlocal", **fields):
  return config_file("fashion_mnist.py", variant, **fields)


def make_source(workdir, c, step=4):
  """A saved run in ``workdir`` whose EMA differs from its parameters and whose data
  statistics are not the defaults; returns its state."""
  run = run_lib.setup(c, str(workdir), check_data=False)
  state = run_lib.init_state(run)
  ts = nnx.merge(run.graphdef, state)
  params = nnx.state(ts.ema, nnx.Param)
  nnx.update(ts.ema, jax.tree.map(lambda p: p + 0.01, params))  # EMA != params
  s = c.decomposition.num_stages
  for m in (ts.model, ts.ema):
    m.set_data_stats(np.linspace(0.1, 0.2, s), np.linspace(0.5, 0.7, s))
  state = nnx.split(ts)[1]
  train._write_config(str(workdir), c)
  ckpt = checkpoint.Checkpointer(run.checkpoint_dir, async_save=False)
  ckpt.save(step, state)
  ckpt.close()
  return state


def flat(tree):
  return {k: np.asarray(v) for k, v in init_from.flatten(nnx.to_pure_dict(tree)).items()}


def initialised(source, c, workdir):
  run = run_lib.setup(c, str(workdir), check_data=False)
  src = init_from.prepare(str(source), run)
  return run, src, init_from.apply(src, run, run_lib.init_state(run))


@pytest.fixture(scope="module")
def fm_source(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("fm")
  return workdir, make_source(workdir, config("fm,runlocal"))


def test_fm_to_dfm_copies_the_backbone_and_zeroes_the_new_stage(fm_source, tmp_path):
  source, src_state = fm_source
  run, src, state = initialised(source, config(), tmp_path)
  # 32x32 patch 4 in the FM twin is the fine stage (index 1); the 16x16 stage is new
  assert src.stage_of == (None, 0)
  ema = flat(src_state["ema"])
  for which in ("model", "ema"):
    got = flat(state[which])
    for name, value in got.items():
      parts = name.split("/")
      if parts[0] in ("blocks", "label_embed"):
        np.testing.assert_array_equal(value, ema[name], err_msg=name)
      elif parts[0] in init_from.STAGE_MODULES and parts[1] == "1":
        np.testing.assert_array_equal(value, ema[name.replace("/1/", "/0/", 1)], err_msg=name)
      elif parts[0] in ("embedders", "heads") or name.startswith("time_embedders/0/fc2"):
        assert not value.any(), name
    assert got["time_embedders/0/fc1/kernel"].any()  # inner layer keeps its init (gradients)
    np.testing.assert_array_equal(
      got["stage_embed/embedding"], ema["stage_embed/embedding"][[0, 0]]
    )
    assert got["data_mean"][1] == ema["data_mean"][0] and got["data_std"][1] == ema["data_std"][0]
  assert int(state["optimizer"]["step"][...]) == 0
  buffers = [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(set(buffers)) == len(buffers)  # the train step donates them: none shared
  mu = jax.tree.leaves(state["optimizer"]["opt_state"])
  assert not any(np.asarray(x).any() for x in mu if np.asarray(x).dtype.kind == "f")


def test_matched_stage_predicts_like_the_source_whatever_the_new_stage(fm_source, tmp_path):
  """New stages add exact zeros: the matched stage's velocity is the FM model's for any input
  and time of the new stage (t = 0 noise, t = 1 data)."""
  source, src_state = fm_source
  src_run = run_lib.setup(config("fm,runlocal"), str(source), check_data=False)
  run, _, state = initialised(source, config(), tmp_path)
  fm = nnx.merge(src_run.ema_graphdef(), src_state["ema"])
  dfm = nnx.merge(run.ema_graphdef(), state["ema"])
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (4, 32, 32, 1))
  labels = jnp.array([0, 3, 9, 10])  # 10: the null class
  t = jax.random.uniform(keys[1], (4, 1))
  (want,) = fm((x,), t, labels, jnp.zeros(4, jnp.int32))
  for k in range(2):
    coarse = jax.random.normal(keys[2 + k], (4, 16, 16, 1)) * 3
    t2 = jnp.concatenate([jax.random.uniform(keys[2 + k], (4, 1)), t], axis=1)
    out = dfm((coarse, x), t2, labels, jnp.full(4, k, jnp.int32))
    np.testing.assert_allclose(out[1], want, rtol=1e-6, atol=1e-6)


def test_stage_upsample_gives_the_coarse_stage_the_pretrained_modules(fm_source, tmp_path):
  source, src_state = fm_source
  c = config(model__stage_upsample=(2, 1))
  run, src, state = initialised(source, c, tmp_path)
  assert run.exp.model.stage_shapes == ((32, 32, 1), (32, 32, 1))
  assert src.stage_of == (0, None)  # both fit; the coarsest takes them, as in the paper
  got, ema = flat(state["model"]), flat(src_state["ema"])
  np.testing.assert_array_equal(got["heads/0/linear/kernel"], ema["heads/0/linear/kernel"])
  assert not got["embedders/1/kernel"].any()
  dec = run.exp.decomposition
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  stages = dec.split(images)
  assert stages[0].shape == (2, 32, 32, 1)
  np.testing.assert_allclose(dec.merge(stages), images, atol=1e-5)


def test_plain_fine_tuning_copies_every_tensor(tmp_path):
  c = config()
  src_state = make_source(tmp_path / "a", c)
  _, src, state = initialised(tmp_path / "a/checkpoints/4", c, tmp_path / "b")
  assert src.stage_of == (0, 1) and src.step == 4
  ema, got = flat(src_state["ema"]), flat(state["model"])
  for name in got:
    np.testing.assert_array_equal(got[name], ema[name], err_msg=name)


@pytest.mark.parametrize(
  "fields, names",
  [
    ({"model__hidden_size": 64, "model__num_heads": 4}, ["blocks/attn/qkv/kernel", "(1, 64, 192)"]),
    ({"model__depth": 2}, ["blocks/mlp/fc1/kernel", "(2, 32, 128)"]),
    ({"data__num_classes": 5}, ["label_embed/embedding", "(6, 32)"]),
    ({"data__channels": 3}, ["embedders/1/kernel", "(48, 32)", "heads/1/linear"]),
  ],
)
def test_mismatch_names_the_tensors(fm_source, tmp_path, fields, names):
  source, _ = fm_source
  run = run_lib.setup(config(**fields), str(tmp_path), check_data=False)
  with pytest.raises(init_from.InitFromMismatchError) as e:
    init_from.prepare(str(source), run)
  message = str(e.value)
  assert "\n" not in message
  for name in names:
    assert name in message, message


def test_no_fitting_stage_and_bad_paths_are_clear(fm_source, tmp_path):
  source, _ = fm_source
  run = run_lib.setup(config(model__patch_size=1), str(tmp_path), check_data=False)
  with pytest.raises(init_from.InitFromMismatchError, match="token grid"):
    init_from.prepare(str(source), run)
  run = run_lib.setup(config(), str(tmp_path), check_data=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    init_from.prepare(str(tmp_path / "nowhere"), run)
  with pytest.raises(FileNotFoundError, match="neither a workdir"):
    init_from.prepare(str(tmp_path), run)


def test_a_workdir_with_its_own_checkpoint_resumes_from_it(tmp_path):
  """Once the fine-tuning run has saved, init_from is not looked at (here: it does not exist)."""
  c = config(total_steps=4, init_from=str(tmp_path / "gone"))
  own = make_source(tmp_path / "b", c, step=4)
  state = train.train(c, str(tmp_path / "b"))
  np.testing.assert_array_equal(
    flat(state["model"])["blocks/mlp/fc1/kernel"], flat(own["model"])["blocks/mlp/fc1/kernel"]
  )


def test_damaged_source_step_is_an_error(tmp_path):
  c = config()
  make_source(tmp_path / "a", c)
  run = run_lib.setup(c, str(tmp_path / "b"), check_data=False)
  src = init_from.prepare(str(tmp_path / "a/checkpoints/4"), run)
  manifest = tmp_path / "a/checkpoints/4/integrity/metadata"
  data = json.loads(manifest.read_text())
  entry = data["arrays"]["ema/blocks/mlp/fc1/kernel"]
  entry["checksum"] = "0" * 16 if entry["checksum"] != "0" * 16 else "1" * 16
  manifest.write_text(json.dumps(data))
  with pytest.raises(checkpoint.CheckpointCorruptError, match="checksum"):
    init_from.apply(src, run, run_lib.init_state(run))


@pytest.mark.integration
def test_cli_fm_to_dfm_trains_and_samples(tmp_path):
  import subprocess

  a, b = str(tmp_path / "a"), str(tmp_path / "b")

  def main(workdir, variant, *args):
    cmd = [sys.executable, "-m", "dfm_jax.main", f"--config={CONFIG}:{variant}"]
    cmd += [f"--workdir={workdir}", "--config.total_steps=2", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)

  proc = main(a, "fm,runlocal")
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = main(b, "runlocal", f"--config.init_from={a}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "initialising from the EMA weights" in proc.stderr
  saved = read_checkpoint(b)
  new_stage = np.abs(saved["/model/embedders/0/kernel"]).max()
  assert 0 < new_stage < 1e-2  # started at zero, moved by two small (warm-up) steps
  proc = main(b, "runlocal", "--mode=sample", f"--config.init_from={a}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.listdir(os.path.join(b, "samples"))
  proc = main(
    tmp_path / "c", "runlocal", "--config.model.hidden_size=64", f"--config.init_from={a}"
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "blocks/attn/qkv/kernel" in lines[-1], proc.stderr
