"""Training in-process on 8 forced CPU devices: FSDP equals one device, checkpoints move between
meshes, the non-finite guard, validation, and the sharding rules."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from dfm_jax import experiment, sharding, train
from tests.train_utils import read_checkpoint, tiny_config

# Whole training runs in-process (tens of seconds each on 2 cores).
pytestmark = pytest.mark.integration


def _params(state):
  return {
    "/".join(map(str, p)): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state["model"]))[0]
  }


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one"))
  state = train.train(tiny_config(total_steps=4), workdir, devices=jax.devices()[:1])
  return workdir, _params(state)


def test_fsdp_on_8_devices_matches_one_device(one_device_run, tmp_path):
  _, reference = one_device_run
  config = tiny_config(total_steps=4, mesh__shape=(1, 8, 1))
  state = train.train(config, str(tmp_path), devices=jax.devices())
  specs = [v.sharding.spec for v in jax.tree.leaves(state["model"])]
  assert any("fsdp" in tuple(s) for s in specs), "no parameter was sharded over fsdp"
  opt_specs = [v.sharding.spec for v in jax.tree.leaves(state["optimizer"])]
  assert any("fsdp" in tuple(s) for s in opt_specs), "optimizer state is not sharded"
  _assert_close(_params(state), reference)


@pytest.mark.parametrize("first,second", [((1, 1, 1), (1, 8, 1)), ((2, 2, 2), (1, 1, 1))])
def test_checkpoint_moves_between_meshes(one_device_run, tmp_path, first, second):
  """Save at step 2 on one mesh, resume to step 4 on another: same as never stopping."""
  _, reference = one_device_run
  devices = lambda shape: jax.devices()[: int(np.prod(shape))]
  train.train(tiny_config(total_steps=2, mesh__shape=first), str(tmp_path), devices(first))
  state = train.train(
    tiny_config(total_steps=4, mesh__shape=second), str(tmp_path), devices(second)
  )
  _assert_close(_params(state), reference)


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  """Latents containing NaN: the run stops naming the step; checkpoints before it stay good."""
  latents = np.random.default_rng(0).normal(size=(32, 8, 8, 2)).astype(np.float32)
  latents[5] = np.nan
  path = os.path.join(tmp_path, "latents.npz")
  np.savez(path, latents=latents, labels=np.zeros(32, np.int32))
  config = tiny_config(
    total_steps=40,
    checkpoint_every=1,
    log_every=1,
    data__source="latents",
    data__path=path,
    data__resolution=8,
    data__channels=2,
    decomposition__num_stages=2,
    flow__stage_probs=(0.5, 0.5),
    sampler__steps_per_stage=(2, 1),
    sampler__thresholds=(0.5,),
  )
  workdir = str(tmp_path / "run")
  # With preconditioning the NaN already stops the run at the data statistics, before step 1.
  with pytest.raises(ValueError, match="data statistics must be finite"):
    train.train(config, str(tmp_path / "precond"), devices=jax.devices()[:1])
  config.model.precondition = False
  with pytest.raises(train.NonFiniteError, match=r"non-finite loss .*at step (\d+)") as err:
    train.train(config, workdir, devices=jax.devices()[:1])
  bad_step = int(err.value.args[0].split("at step ")[1].split()[0])
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved and max(saved) == bad_step - 1
  for value in read_checkpoint(workdir).values():
    assert np.isfinite(value).all()


def test_validation_names_every_problem():
  config = tiny_config(
    data__resolution=30,
    batch_size=7,
    flow__stage_probs=(0.5, 0.6, 0.1),
    decomposition__kind="fourier",
  )
  with pytest.raises(ValueError) as err:
    experiment.from_config(config, num_devices=8)
  text = str(err.value)
  assert "batch_size 7 is not divisible by the 8 data-parallel devices" in text
  assert "probability distribution" in text
  assert "unknown decomposition 'fourier'" in text
  config = tiny_config(data__source="idx", data__path="/nonexistent/train-images.gz")
  with pytest.raises(ValueError, match="/nonexistent/train-images.gz"):
    experiment.from_config(config)
  config = tiny_config(data__resolution=30)
  with pytest.raises(
    ValueError,
    match=r"cannot be split into 3 stages.*nearest sizes that work: "
    r"28, 32",
  ):
    experiment.from_config(config)


def test_logical_rules_replicate_what_does_not_divide():
  mesh = sharding.make_mesh((1, 4, 2), jax.devices())
  rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
  spec = sharding.logical_to_mesh_spec(("embed", "mlp"), (8, 6), rules, mesh)
  assert tuple(spec) == ("fsdp", "tensor")
  spec = sharding.logical_to_mesh_spec(("embed", "mlp"), (6, 5), rules, mesh)
  assert tuple(spec) == (None, None)
  spec = sharding.logical_to_mesh_spec(("mlp", "heads"), (4, 4), rules, mesh)
  assert tuple(spec) == ("tensor", None)  # a mesh axis is used once per array
