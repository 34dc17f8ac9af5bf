"""The metric CNN: held-out accuracy, Frechet distance sanity, cache round trip, determinism."""

import copy
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage

from dfm_jax.data import load_idx_dataset, load_mnist5k, pad_to
from dfm_jax.evaluation import classifier as C

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Trains the metric network (tens of seconds on 2 cores).
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits():
  """4,000 training and 1,000 held-out digits; the file is sorted by label, so shuffle first."""
  x, y = load_mnist5k()
  x = pad_to(x, 32)
  perm = np.random.default_rng(0).permutation(len(x))
  train, test = perm[:4000], perm[4000:]
  return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  root = tmp_path_factory.mktemp("dfm_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DFM_JAX_CACHE", str(root))
    yield root


@pytest.fixture(scope="module")
def clf(digits, cache):
  x, y, _, _ = digits
  return C.get_classifier("mnist4k", x, y)


def test_held_out_accuracy(clf, digits):
  _, _, x_test, y_test = digits
  assert clf.accuracy(x_test, y_test) >= 0.95


def test_features_shape_and_batching(clf, digits):
  x = digits[2][:7]
  feats = clf.features(x)
  assert feats.shape == (7, C.FEATURE_DIM) and feats.dtype == np.float32
  # A batch smaller than the images exercises the padded tail; results must not change.
  small = copy.copy(clf)
  small.batch_size = 3
  np.testing.assert_allclose(small.features(x), feats, rtol=1e-5, atol=1e-6)
  assert clf.features(x[:0]).shape == (0, C.FEATURE_DIM)
  with pytest.raises(ValueError, match="uint8"):
    clf.features(x.astype(np.float32))


def test_frechet_distance_separates_real_from_corrupted(clf, digits):
  _, _, x_test, _ = digits
  half_a, half_b = x_test[:500], x_test[500:]
  rng = np.random.default_rng(1)
  noise = rng.integers(0, 256, size=half_b.shape, dtype=np.uint8)
  blurred = scipy.ndimage.gaussian_filter(half_b.astype(np.float32), sigma=(0, 2, 2, 0))
  blurred = np.clip(np.round(blurred), 0, 255).astype(np.uint8)

  fd_real = C.classifier_frechet_distance(clf, half_a, half_b)
  fd_noise = C.classifier_frechet_distance(clf, noise, half_a)
  fd_blur = C.classifier_frechet_distance(clf, blurred, half_a)
  assert fd_real < 0.1 * fd_blur
  assert fd_real < 0.02 * fd_noise


def test_cache_round_trip(clf, digits, cache, monkeypatch):
  x, y, x_test, _ = digits
  assert (cache / "classifier" / "mnist4k.npz").exists()

  def no_training(*args, **kwargs):
    raise AssertionError("cached weights were not reused")

  monkeypatch.setattr(C, "train_classifier", no_training)
  loaded = C.get_classifier("mnist4k", x, y)
  np.testing.assert_array_equal(loaded.predict(x_test), clf.predict(x_test))
  np.testing.assert_array_equal(loaded.features(x_test[:50]), clf.features(x_test[:50]))
  # A cache entry trained on other data is refused rather than silently reused.
  with pytest.raises(ValueError, match="different data"):
    C.get_classifier("mnist4k", x[:3000], y[:3000])


def test_training_is_deterministic(digits):
  x, y, x_test, _ = digits
  config = C.TrainConfig(epochs=1)
  a = C.Classifier(C.train_classifier(x[:512], y[:512], config))
  b = C.Classifier(C.train_classifier(x[:512], y[:512], config))
  np.testing.assert_array_equal(a.features(x_test[:100]), b.features(x_test[:100]))


def test_fashion_mnist_accuracy(cache):
  x, y = load_idx_dataset(str(FASHION_DIR / "train-images-idx3-ubyte.gz"))
  x_test, y_test = load_idx_dataset(str(FASHION_DIR / "t10k-images-idx3-ubyte.gz"))
  x, x_test = pad_to(x, 32), pad_to(x_test, 32)
  clf = C.get_classifier("fashion_mnist", x, y)
  assert clf.accuracy(x_test, y_test) >= 0.88
