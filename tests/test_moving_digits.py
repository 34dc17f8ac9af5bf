"""Moving digits: determinism, bounce physics, rendering and labels."""

import numpy as np
import pytest


from dfm_jax.data import moving_digits as md  # noqa: E402


def test_deterministic_per_seed_and_index():
  a = md.MovingDigits(20, frames=6, resolution=64, seed=3)
  b = md.MovingDigits(20, frames=6, resolution=64, seed=3)
  c = md.MovingDigits(20, frames=6, resolution=64, seed=4)
  # Any access order gives the same element.
  for i in (7, 0, 19, 7):
    np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
    assert a[i]["label"] == b[i]["label"]
  assert a[-1]["label"] == a[19]["label"]
  assert any(not np.array_equal(a[i]["video"], c[i]["video"]) for i in range(3))
  assert not np.array_equal(a[0]["video"], a[1]["video"])
  with pytest.raises(IndexError):
    a[20]


def test_element_spec():
  ds = md.MovingDigits(4, frames=5, resolution=32, num_digits=2, seed=0)
  item = ds[1]
  assert len(ds) == 4
  assert item["video"].dtype == np.uint8 and item["video"].shape == (5, 32, 32, 1)
  assert item["label"].dtype == np.int32 and item["label"].shape == ()
  assert item["digits"].shape == (2,) and item["label"] == item["digits"][0]


def test_fold_reflects_into_range():
  u = np.array([-3.0, 0.0, 2.0, 10.0, 13.0, 20.0, 27.0, 41.0])
  np.testing.assert_allclose(md.fold(u, 10.0), [3, 0, 2, 10, 7, 0, 7, 1])


@pytest.mark.parametrize("resolution", [32, 64])
def test_bounce_physics(resolution):
  ds = md.MovingDigits(30, frames=40, resolution=resolution, seed=1)
  bounced = 0
  for i in range(len(ds)):
    traj = ds.trajectory(i)[:, 0]  # [T, 2]
    v = ds.parameters(i)["velocity"][0]
    assert traj.min() >= 0 and traj.max() <= ds.free_range
    step = np.diff(traj, axis=0)  # [T-1, 2]
    # Each axis moves by at most |v| per frame, exactly |v| between bounces ...
    assert np.all(np.abs(step) <= np.abs(v) + 1e-9)
    free = np.isclose(np.abs(step), np.abs(v))
    assert free.mean() > 0.5
    # ... and a reflection reverses the direction of that axis.
    for axis in range(2):
      s = step[:, axis][free[:, axis]]
      bounced += np.count_nonzero(np.diff(np.sign(s)))
  assert bounced > 0  # the test exercised bounces
  speeds = np.linalg.norm(np.stack([ds.parameters(i)["velocity"][0] for i in range(30)]), axis=1)
  lo, hi = ds.speed
  assert np.all((speeds >= lo) & (speeds <= hi))


def test_constant_speed_without_borders():
  # With a tiny speed over few frames no bounce happens: the motion is exactly linear.
  ds = md.MovingDigits(10, frames=4, resolution=64, seed=2, speed=(0.5, 0.5))
  checked = 0
  for i in range(10):
    p = ds.parameters(i)
    unfolded = p["start"][0] + np.arange(4)[:, None] * p["velocity"][0]
    if np.all((unfolded >= 0) & (unfolded <= ds.free_range)):
      np.testing.assert_allclose(ds.trajectory(i)[:, 0], unfolded, atol=1e-12)
      checked += 1
  assert checked >= 8


def test_rendering_matches_trajectory_and_label():
  images, labels = md._mnist()
  ds = md.MovingDigits(8, frames=10, resolution=64, seed=5)
  for i in range(len(ds)):
    item, p = ds[i], ds.parameters(i)
    row = p["digit_index"][0]
    assert item["label"] == labels[row]
    corners = np.rint(ds.trajectory(i)[:, 0]).astype(int)
    for t, (y, x) in enumerate(corners):
      frame = item["video"][t, ..., 0]
      np.testing.assert_array_equal(frame[y : y + 28, x : x + 28], images[row])
      # Nothing outside the digit's box.
      outside = frame.copy()
      outside[y : y + 28, x : x + 28] = 0
      assert not outside.any()


def test_split_digits_are_disjoint():
  _, labels = md._mnist()
  train, test = md.split_indices(labels, "train"), md.split_indices(labels, "test")
  assert len(test) == 500 and len(train) == 4500 and not np.intersect1d(train, test).size
  ds = md.MovingDigits(50, frames=2, resolution=32, seed=0, split="test")
  rows = [ds.parameters(i)["digit_index"][0] for i in range(50)]
  assert np.isin(rows, test).all()
  with pytest.raises(ValueError):
    md.MovingDigits(1, 2, 32, split="val")
  with pytest.raises(ValueError):
    md.MovingDigits(1, 2, 20)
