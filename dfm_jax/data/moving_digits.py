"""Procedural moving-digits videos built from the 5,000 embedded MNIST digits (numpy only).

Each video shows `num_digits` 28x28 MNIST digits moving in straight lines at a constant speed
inside a square frame of `resolution` pixels and bouncing off its borders (elastic reflection,
each axis separately). Everything about video `i` (which digits, start positions, velocities) is
drawn from ``np.random.default_rng([seed, i])``, so a video depends only on (seed, index,
constructor arguments) and any index can be produced on its own, in any order, by any worker.

Physics, for the top-left corner ``p(t) = (y, x)`` of a digit and the free range
``L = resolution - 28``: the unfolded position ``u(t) = p0 + v t`` is folded into ``[0, L]`` by the
triangle wave ``fold(u) = L - |mod(u, 2L) - L|``. Between bounces every axis moves by exactly
``|v_axis|`` per frame; positions never leave ``[0, L]``, so a digit is never clipped. Frames are
rendered at the rounded positions and digits are combined with a pixel-wise maximum.

`MovingDigits` implements Grain's ``RandomAccessDataSource`` protocol (``__len__``,
``__getitem__``); an element is ``{'video': uint8 [T, R, R, 1], 'label': int32 []}`` plus
``'digits': int32 [num_digits]`` (the class of every digit; ``label`` is the first one's).
"""

from __future__ import annotations

import functools

import numpy as np

from dfm_jax.data.arrays import load_mnist5k

DIGIT_SIZE = 28
# Of the 500 digits per class in the MNIST-5k table, the first 450 are 'train', the last 50 'test'.
_TEST_PER_CLASS = 50
SPLITS = ("all", "train", "test")


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
  """The 5k digits as uint8 [5000, 28, 28] and int32 labels [5000] (read once per process)."""
  images, labels = load_mnist5k()
  return images[..., 0], labels


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """Indices [M] into `labels` [N] of one split: 'all', 'train' or 'test' (last 50 per class)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  labels = np.asarray(labels)
  if split == "all":
    return np.arange(len(labels))
  keep = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    keep.append(idx[-_TEST_PER_CLASS:] if split == "test" else idx[:-_TEST_PER_CLASS])
  return np.sort(np.concatenate(keep))


def fold(u: np.ndarray, length: float) -> np.ndarray:
  """Folds unbounded positions into ``[0, length]`` by reflection at both ends (same shape)."""
  u = np.asarray(u, np.float64)
  if length <= 0:
    return np.zeros_like(u)
  return length - np.abs(np.mod(u, 2.0 * length) - length)


class MovingDigits:
  """Random-access moving-digits videos, deterministic per (seed, index).

  Args:
    num_videos: dataset length (any index in ``[0, num_videos)`` is valid).
    frames: T, frames per video.
    resolution: R, frame height and width in pixels (>= 28).
    num_digits: digits per video.
    seed: dataset seed; videos of different seeds are independent.
    speed: (min, max) speed in pixels per frame; the speed of each digit is uniform in it and its
      direction uniform on the circle. None -> ``(2, 4) * resolution / 64``.
    split: which MNIST-5k digits to draw from: 'all', 'train' (450 per class) or 'test' (50).
  """

  def __init__(
    self,
    num_videos: int,
    frames: int,
    resolution: int,
    num_digits: int = 1,
    seed: int = 0,
    speed: tuple[float, float] | None = None,
    split: str = "all",
  ):
    if num_videos < 0 or frames < 1 or num_digits < 1:
      raise ValueError(
        f"need num_videos >= 0, frames >= 1, num_digits >= 1; got {num_videos}, "
        f"{frames}, {num_digits}"
      )
    if resolution < DIGIT_SIZE:
      raise ValueError(f"resolution must be >= {DIGIT_SIZE}, got {resolution}")
    self.num_videos = int(num_videos)
    self.frames = int(frames)
    self.resolution = int(resolution)
    self.num_digits = int(num_digits)
    self.seed = int(seed)
    scale = resolution / 64.0
    self.speed = tuple(float(s) for s in (speed or (2.0 * scale, 4.0 * scale)))
    if not 0 <= self.speed[0] <= self.speed[1]:
      raise ValueError(f"speed must be (min, max) with 0 <= min <= max, got {self.speed}")
    self.split = split
    images, labels = _mnist()
    self._pool = split_indices(labels, split)
    self._images, self._labels = images, labels

  @property
  def free_range(self) -> int:
    """L: the largest top-left coordinate a digit can take."""
    return self.resolution - DIGIT_SIZE

  def __len__(self) -> int:
    return self.num_videos

  def __repr__(self) -> str:
    return (
      f"MovingDigits(num_videos={self.num_videos}, frames={self.frames}, "
      f"resolution={self.resolution}, num_digits={self.num_digits}, seed={self.seed}, "
      f"split={self.split!r})"
    )

  def _check_index(self, index: int) -> int:
    index = int(index)
    if index < 0:
      index += self.num_videos
    if not 0 <= index < self.num_videos:
      raise IndexError(f"index {index} out of range for {self.num_videos} videos")
    return index

  def parameters(self, index: int) -> dict[str, np.ndarray]:
    """The random draws of video `index`.

    Returns:
      ``digit_index`` int64 [K] (rows of the MNIST-5k table), ``start`` float64 [K, 2] (y, x)
      top-left corners, ``velocity`` float64 [K, 2] (pixels per frame), with K = num_digits.
    """
    index = self._check_index(index)
    rng = np.random.default_rng([self.seed, index])
    k = self.num_digits
    digit_index = self._pool[rng.integers(0, len(self._pool), size=k)]
    start = rng.uniform(0.0, self.free_range, size=(k, 2))
    angle = rng.uniform(0.0, 2.0 * np.pi, size=k)
    speed = rng.uniform(self.speed[0], self.speed[1], size=k)
    velocity = np.stack([np.sin(angle), np.cos(angle)], axis=-1) * speed[:, None]
    return {"digit_index": digit_index, "start": start, "velocity": velocity}

  def trajectory(self, index: int) -> np.ndarray:
    """Exact (unrounded) top-left corners, float64 [T, K, 2] (y, x), all in [0, L]."""
    p = self.parameters(index)
    t = np.arange(self.frames, dtype=np.float64)[:, None, None]
    return fold(p["start"][None] + p["velocity"][None] * t, self.free_range)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Video `index`: ``{'video': uint8 [T, R, R, 1], 'label': int32 [], 'digits': int32 [K]}``."""
    p = self.parameters(index)
    corners = np.rint(self.trajectory(index)).astype(np.int64)  # [T, K, 2]
    video = np.zeros((self.frames, self.resolution, self.resolution), np.uint8)
    for k, row in enumerate(p["digit_index"]):
      digit = self._images[row]
      for t in range(self.frames):
        y, x = corners[t, k]
        window = video[t, y : y + DIGIT_SIZE, x : x + DIGIT_SIZE]
        np.maximum(window, digit, out=window)
    digits = self._labels[p["digit_index"]].astype(np.int32)
    return {"video": video[..., None], "label": np.int32(digits[0]), "digits": digits}
