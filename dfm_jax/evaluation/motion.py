"""Cheap real checks for generated moving-digits videos: per-frame class accuracy and motion.

* **Per-frame accuracy**: every frame is cut to a 32x32 window centred on its centre of mass
  (the digit, with one digit per video) and classified by the project's small MNIST CNN
  (`classifier.Classifier`, trained on MNIST digits padded to 32x32); the score is the fraction of
  frames whose prediction equals the video's conditioning label. It checks that the digit keeps
  its identity in every frame.
* **Motion consistency**: the centre-of-mass trajectory ``c[t]`` (pixels, (y, x)) of each video
  gives its *speed* ``mean_t |c[t+1] - c[t]|`` and its *roughness* ``mean_t |c[t+1] - 2 c[t] +
  c[t-1]|`` (mean absolute second difference, Euclidean norm). Real moving digits move at a
  constant speed and only change direction at bounces, so their roughness is low (rounding to
  whole pixels and the bounces); temporally incoherent videos (flicker, frames out of order,
  teleporting digits) have a high roughness, static ones a speed near 0. Generated sets are
  compared with a real set by the ratio of mean values and by the 1-D Wasserstein distance of the
  per-video values.

Videos are ``[N, T, H, W, C]`` (uint8 or float, non-negative intensities; C = 1, or C = 3 taken as
the channel mean); frames without mass get a NaN centre and are left out of the means.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.stats

__all__ = [
  "center_of_mass",
  "trajectory_stats",
  "motion_consistency",
  "crop_around_centroid",
  "per_frame_accuracy",
]


def _intensity(videos: np.ndarray) -> np.ndarray:
  """[N, T, H, W, C] -> float64 [N, T, H, W] (channel mean)."""
  v = np.asarray(videos)
  if v.ndim != 5:
    raise ValueError(f"expected videos [N, T, H, W, C], got shape {v.shape}")
  return v.astype(np.float64).mean(axis=-1)


def center_of_mass(videos: np.ndarray) -> np.ndarray:
  """Intensity-weighted centre (y, x) in pixels of every frame: float64 [N, T, 2] (NaN if empty)."""
  m = _intensity(videos)
  h, w = m.shape[-2:]
  total = m.sum(axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    y = (m.sum(axis=-1) * np.arange(h)).sum(axis=-1) / total
    x = (m.sum(axis=-2) * np.arange(w)).sum(axis=-1) / total
  return np.stack([y, x], axis=-1)


def trajectory_stats(videos: np.ndarray) -> dict[str, np.ndarray]:
  """Per-video ``speed`` and ``roughness`` [N] (pixels/frame, pixels/frame^2) of the centre.

  Needs T >= 3; steps touching an empty frame are ignored (NaN where none remain).
  """
  c = center_of_mass(videos)
  if c.shape[1] < 3:
    raise ValueError(f"motion statistics need at least 3 frames, got {c.shape[1]}")
  first = np.linalg.norm(np.diff(c, axis=1), axis=-1)  # [N, T-1]
  second = np.linalg.norm(c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2], axis=-1)  # [N, T-2]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN
    return {"speed": np.nanmean(first, axis=1), "roughness": np.nanmean(second, axis=1)}


def motion_consistency(fake_videos: np.ndarray, real_videos: np.ndarray) -> dict[str, float]:
  """Motion statistics of a generated set against a real set (both [N, T, H, W, C]).

  Returns:
    ``{fake,real}_{speed,roughness}`` (means over videos), ``{speed,roughness}_ratio``
    (fake / real) and ``{speed,roughness}_w1`` (Wasserstein-1 distance between the per-video
    values of the two sets). A faithful generator has ratios near 1 and small distances.
  """
  fake, real = trajectory_stats(fake_videos), trajectory_stats(real_videos)
  out = {}
  for key in ("speed", "roughness"):
    f, r = fake[key][np.isfinite(fake[key])], real[key][np.isfinite(real[key])]
    if not len(f) or not len(r):
      raise ValueError("every video of one set is empty: no centre of mass to track")
    out[f"fake_{key}"], out[f"real_{key}"] = float(f.mean()), float(r.mean())
    out[f"{key}_ratio"] = float(f.mean() / r.mean()) if r.mean() > 0 else float("inf")
    out[f"{key}_w1"] = float(scipy.stats.wasserstein_distance(f, r))
  return out


def crop_around_centroid(videos: np.ndarray, size: int = 32) -> np.ndarray:
  """Crops every frame of ``videos`` [N, T, H, W, C] to ``size`` x ``size`` around its centre.

  The window is centred on the rounded centre of mass (the frame centre for empty frames) and
  filled with zeros where it leaves the frame.

  Returns:
    [N, T, size, size, C], dtype of `videos`.
  """
  v = np.asarray(videos)
  n, t, h, w, c = v.shape
  centre = center_of_mass(v)
  centre = np.where(np.isfinite(centre), centre, [(h - 1) / 2, (w - 1) / 2])
  half = size // 2
  # The window covers [round(centre) - half, round(centre) - half + size) in each axis.
  top = np.rint(centre[..., 0]).astype(np.int64) - half + size  # offsets into the padded frame
  left = np.rint(centre[..., 1]).astype(np.int64) - half + size
  padded = np.pad(v, ((0, 0), (0, 0), (size, size), (size, size), (0, 0)))
  rows = top[..., None] + np.arange(size)  # [N, T, size]
  cols = left[..., None] + np.arange(size)
  ni, ti = np.arange(n)[:, None, None, None], np.arange(t)[None, :, None, None]
  return padded[ni, ti, rows[..., :, None], cols[..., None, :]]


def per_frame_accuracy(
  classifier, videos: np.ndarray, labels: np.ndarray
) -> dict[str, np.ndarray | float]:
  """Fraction of frames classified as their video's label.

  Args:
    classifier: a `dfm_jax.evaluation.classifier.Classifier` (uint8 [M, 32, 32, 1] inputs).
    videos: uint8 [N, T, H, W, 1] single-digit videos (H, W >= 28 recommended).
    labels: [N] conditioning labels.

  Returns:
    ``accuracy`` (float, over all N * T frames), ``per_frame`` float [T] (accuracy at each time
    step) and ``per_video`` float [N].
  """
  v = np.asarray(videos)
  if v.dtype != np.uint8 or v.ndim != 5 or v.shape[-1] != 1:
    raise ValueError(f"expected uint8 videos [N, T, H, W, 1], got {v.dtype} {v.shape}")
  labels = np.asarray(labels)
  n, t = v.shape[:2]
  crops = crop_around_centroid(v, 32).reshape(n * t, 32, 32, 1)
  correct = (classifier.predict(crops).reshape(n, t) == labels[:, None]).astype(np.float64)
  return {
    "accuracy": float(correct.mean()),
    "per_frame": correct.mean(axis=0),
    "per_video": correct.mean(axis=1),
  }
