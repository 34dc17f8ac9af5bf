"""I3D parity with cd-fvd's PyTorch I3D on seeded random weights (no torch needed here).

Fixtures from tests/fixtures/make_i3d_fixture.py: the reference state dict (the
i3d_pretrained_400.pt key layout), xz-compressed, and reference outputs in NCTHW layout.
Tolerance: max |ours - reference| <= REL_TOL * max |reference| + 1e-5 (float32; measured
5.5e-6 relative on the pre-pool features and 7.2e-7 on the logits by bench/parity.py).
"""

import lzma
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax.evaluation import i3d
from dfm_jax.evaluation.metrics import feature_statistics, frechet_distance

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


# About 10x the error bench/parity.py measures on a CPU (docs/bench_parity.json): 5.5e-6 on the
# pre-pool features, 9e-7 in preprocessing.
REL_TOL = 5e-5
PREPROCESS_REL_TOL = 1e-5


def _close(ours, ref, rel=REL_TOL):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= rel * np.abs(ref).max() + 1e-5, (err, np.abs(ref).max())


@pytest.fixture(scope="module")
def reference():
  with np.load(os.path.join(FIXTURES, "i3d_reference.npz")) as data:
    return dict(data)


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("i3d") / "i3d_random_weights.pt"
  with lzma.open(os.path.join(FIXTURES, "i3d_random_weights.pt.xz")) as f:
    path.write_bytes(f.read())
  return path


@pytest.fixture(scope="module")
def model(weights_path):
  return i3d.load_i3d(weights_path)


def _ncthw_to_ours(x):
  return np.asarray(x).transpose(0, 2, 3, 4, 1)


def test_preprocess_matches_torch_interpolate(reference):
  video = reference["pre_video"]  # [2, 3, 40, 48, 3]
  _close(i3d.preprocess(video, (16, 20)), _ncthw_to_ours(reference["pre_down"]), PREPROCESS_REL_TOL)
  _close(
    i3d.preprocess(video[:, :, :8, :10], (30, 28)),
    _ncthw_to_ours(reference["pre_up"]),
    PREPROCESS_REL_TOL,
  )
  grey = i3d.preprocess(video[..., :1], (16, 20))
  assert grey.shape == (2, 3, 16, 20, 3)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_weight_layout(model, weights_path):
  sd = i3d.load_torch_file(weights_path)
  k = np.asarray(model.Conv3d_1a_7x7.conv.kernel[...])
  np.testing.assert_array_equal(k, sd["Conv3d_1a_7x7.conv3d.weight"].transpose(2, 3, 4, 1, 0))
  assert np.asarray(model.logits.conv.kernel[...]).shape == (1, 1, 1, 1024, 400)
  np.testing.assert_array_equal(model.Mixed_5c.b1b.bn.var[...], sd["Mixed_5c.b1b.bn.running_var"])
  # Every tensor of the file but the batch counters is used, and nothing else is in the model.
  n_file = sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
  n_model = sum(np.asarray(v).size for v in jax.tree_util.tree_leaves(nnx.state(model)))
  assert n_model == n_file


def test_loader_rejects_other_layouts(model, weights_path):
  sd = i3d.load_torch_file(weights_path)
  with pytest.raises(ValueError, match="1 missing"):
    i3d.i3d_params_from_torch({k: v for k, v in sd.items() if k != "logits.conv3d.bias"}, model)
  with pytest.raises(ValueError, match="1 unexpected"):
    i3d.i3d_params_from_torch({**sd, "extra.weight": np.zeros(1)}, model)
  prefixed = {f"module.{k}": v for k, v in sd.items()}
  i3d.i3d_params_from_torch(prefixed, model)  # DataParallel prefix accepted


def test_forward_parity_early_blocks(model, reference):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).pre_pool(x, "Mixed_3b"))
  ours = fn(state, _ncthw_to_ours(reference["small_input"][:1]))
  _close(ours, _ncthw_to_ours(reference["small_mixed_3b"]))


@pytest.mark.integration
def test_forward_parity_pre_pool(model, reference):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, output="pre_pool"))
  _close(
    fn(state, _ncthw_to_ours(reference["small_input"])), _ncthw_to_ours(reference["small_prepool"])
  )


@pytest.mark.integration
def test_fvd_features_parity(model, reference):
  """The full FVD path: uint8 [2, 16, 64, 64, 3] -> 224 x 224 -> 400 logits / 1024 pool."""
  video = reference["full_video"]
  _close(i3d.i3d_features(model, video, batch_size=2), reference["full_logits"])
  _close(i3d.i3d_features(model, video, batch_size=2, output="pool"), reference["full_pool"])
  # Batching with a padded tail gives the same features.
  _close(i3d.i3d_features(model, video, batch_size=3), reference["full_logits"])


def test_shapes_and_small_inputs(model):
  graphdef, state = nnx.split(model)

  def shape(x_shape, output):
    fn = lambda s: nnx.merge(graphdef, s)(jnp.zeros(x_shape), output=output)  # noqa: E731
    return jax.eval_shape(fn, state).shape

  assert shape((2, 16, 224, 224, 3), "logits") == (2, 400)
  assert shape((2, 16, 224, 224, 3), "pool") == (2, 1024)
  assert shape((1, 16, 224, 224, 3), "pre_pool") == (1, 2, 7, 7, 1024)
  assert shape((1, 9, 193, 193, 3), "logits") == (1, 400)
  with pytest.raises(ValueError, match="T >= 9"):
    shape((1, 8, 224, 224, 3), "logits")
  with pytest.raises(ValueError, match="H, W >= 193"):
    shape((1, 16, 192, 224, 3), "pool")


def test_fvd_from_features():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(300, 8))
  fake = rng.normal(size=(200, 8)) * 1.5 + 0.5
  expected = frechet_distance(*feature_statistics(fake), *feature_statistics(real))
  assert i3d.fvd_from_features(fake, real) == pytest.approx(expected)
  assert i3d.fvd_from_features(real, real) == pytest.approx(0.0, abs=1e-8)
  # Gaussian closed form: |d mu|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) = 8 * 0.25 + 8 * 0.25 = 4.
  assert i3d.fvd_from_features(fake, real) == pytest.approx(4.0, rel=0.25)
