"""Moving-digits checks: the motion measures separate real clips from temporally broken ones."""

import numpy as np
import pytest


from dfm_jax.data.moving_digits import MovingDigits  # noqa: E402
from dfm_jax.evaluation import motion  # noqa: E402


@pytest.fixture(scope="module")
def real():
  ds = MovingDigits(48, frames=12, resolution=64, seed=0, split="test")
  videos = np.stack([ds[i]["video"] for i in range(len(ds))])
  labels = np.array([ds[i]["label"] for i in range(len(ds))])
  return ds, videos, labels


def test_center_of_mass_follows_the_digit(real):
  ds, videos, _ = real
  com = motion.center_of_mass(videos[:4])
  assert com.shape == (4, 12, 2)
  for i in range(4):
    corner = np.rint(ds.trajectory(i)[:, 0])
    offset = com[i] - corner  # the digit's own centre inside its 28x28 box: constant
    np.testing.assert_allclose(offset, np.broadcast_to(offset[0], offset.shape), atol=1e-9)
  empty = np.zeros((1, 3, 8, 8, 1), np.uint8)
  assert np.isnan(motion.center_of_mass(empty)).all()


def test_motion_separates_real_from_shuffled_frames(real):
  _, videos, _ = real
  rng = np.random.default_rng(0)
  shuffled = np.stack([v[rng.permutation(len(v))] for v in videos])
  other = MovingDigits(48, frames=12, resolution=64, seed=1, split="test")
  real2 = np.stack([other[i]["video"] for i in range(len(other))])
  same = motion.motion_consistency(real2, videos)
  broken = motion.motion_consistency(shuffled, videos)
  # Real vs real: ratios near 1. Shuffled frames: an order of magnitude rougher.
  assert abs(same["roughness_ratio"] - 1) < 0.3 and abs(same["speed_ratio"] - 1) < 0.2
  assert broken["roughness_ratio"] > 5 and broken["roughness_w1"] > 10 * same["roughness_w1"]
  # Per video, every shuffled clip is rougher than every real clip but a few.
  r_real = motion.trajectory_stats(videos)["roughness"]
  r_shuf = motion.trajectory_stats(shuffled)["roughness"]
  assert np.mean(r_shuf > np.quantile(r_real, 0.95)) > 0.9
  # A frozen video is perfectly smooth, but its speed gives it away.
  static = motion.motion_consistency(np.repeat(videos[:, :1], 12, axis=1), videos)
  assert static["fake_speed"] == 0 and static["speed_ratio"] == 0


def test_crop_around_centroid(real):
  ds, videos, _ = real
  crops = motion.crop_around_centroid(videos[:3], 32)
  assert crops.shape == (3, 12, 32, 32, 1) and crops.dtype == np.uint8
  # The whole digit is inside the crop, centred: nothing is lost.
  np.testing.assert_array_equal(crops.sum(axis=(2, 3, 4)), videos[:3].sum(axis=(2, 3, 4)))
  com = motion.center_of_mass(crops)
  assert np.all(np.abs(com - 15.5) <= 1.0)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  from dfm_jax.data import moving_digits
  from dfm_jax.evaluation import classifier as C

  images, labels = moving_digits._mnist()  # [5000, 28, 28], [5000]
  train = moving_digits.split_indices(labels, "train")  # the clips use the 'test' digits
  x = np.pad(images[train], ((0, 0), (2, 2), (2, 2)))[..., None]  # [4500, 32, 32, 1]
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DFM_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    # A short recipe (a few seconds): the test needs a usable classifier, not a good one.
    yield C.get_classifier("mnist_train450", x, labels[train], C.TrainConfig(epochs=2))


class _OracleClassifier:
  """Predicts the digit class by matching the 32x32 crop against the clip's own digits."""

  def __init__(self, templates, labels):
    self.templates, self.labels = templates.astype(np.float64), labels

  def predict(self, images):
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 1)
    d = ((images[:, None].astype(np.float64) - self.templates[None]) ** 2).sum(axis=(2, 3, 4))
    return self.labels[d.argmin(axis=1)]


def test_per_frame_accuracy_logic(real):
  _, videos, labels = real
  # Templates: the first frame of each clip, cropped the same way.
  templates = motion.crop_around_centroid(videos[:, :1])[:, 0]
  clf = _OracleClassifier(templates, labels)
  res = motion.per_frame_accuracy(clf, videos[:8], labels[:8])
  assert res["accuracy"] == 1.0 and res["per_frame"].shape == (12,)
  wrong = motion.per_frame_accuracy(clf, videos[:8], (labels[:8] + 1) % 10)
  assert wrong["accuracy"] == 0.0 and wrong["per_video"].shape == (8,)


@pytest.mark.integration
def test_per_frame_accuracy(real, classifier):
  """With the project's CNN (a short 2-epoch recipe, about 15 s of training on 2 CPU cores)."""
  _, videos, labels = real
  res = motion.per_frame_accuracy(classifier, videos, labels)
  wrong = motion.per_frame_accuracy(classifier, videos, (labels + 1) % 10)
  assert res["per_frame"].shape == (12,) and res["per_video"].shape == (48,)
  assert res["accuracy"] > 0.8 and wrong["accuracy"] < 0.1
  # Shuffling frames keeps the digit: accuracy is unchanged (motion is measured separately).
  shuffled = videos[:, ::-1]
  assert motion.per_frame_accuracy(classifier, shuffled, labels)["accuracy"] == pytest.approx(
    res["accuracy"]
  )
  with pytest.raises(ValueError):
    motion.per_frame_accuracy(classifier, videos.astype(np.float32), labels)
