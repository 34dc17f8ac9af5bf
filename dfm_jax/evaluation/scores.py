"""Sample-quality metrics, registered by name in :data:`METRICS` and chosen by
``config.eval.metrics``.

Every metric reads an :class:`EvalContext` (the generated pictures, their labels, the reference
pictures and a cache shared between metrics, so FID, KID and IS run Inception once) and returns a
dict of numbers. A metric that does not apply to a config (FDD without DINOv2 weights, the
classifier measures without a classifier) says so in ``enabled`` and is left out.

Add one with ``@METRICS.register("name")`` on a :class:`Metric` subclass. Video configs
(``data.frames`` > 0, pictures ``[N, T, H, W, C]``) use ``frame_fid``, ``fvd`` and ``motion``; the
image metrics (fid, kid, is, fdd, classifier) are disabled for them.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Callable

import numpy as np

from dfm_jax import storage
from dfm_jax.registry import Registry

METRICS: Registry = Registry("metric")


@dataclasses.dataclass
class EvalContext:
  """What the metrics of one evaluation share.

  Attributes:
    config: the run's config (``eval`` block: weights, classifier, batch sizes).
    fake: uint8 generated pictures ``[N, H, W, C]`` (videos: ``[N, T, H, W, C]``).
    labels: int32 ``[N]`` conditioning labels.
    load_real: returns the uint8 reference pictures ``[M, H', W', C']`` (called at most once).
    ref_key: cache key for the reference set's Inception statistics (``None``: no cache).
  """

  config: Any
  fake: np.ndarray
  labels: np.ndarray
  load_real: Callable[[], np.ndarray]
  ref_key: str | None = None
  progress: bool = False
  _cache: dict = dataclasses.field(default_factory=dict)

  def cached(self, name: str, fn: Callable[[], Any]) -> Any:
    if name not in self._cache:
      self._cache[name] = fn()
    return self._cache[name]

  def real(self) -> np.ndarray:
    return self.cached("real", self.load_real)


class Metric(abc.ABC):
  """One entry of ``eval.metrics``."""

  @classmethod
  def enabled(cls, config) -> bool:
    """Whether this metric applies to ``config`` (e.g. its weights are configured)."""
    del config
    return True

  @classmethod
  def check_config(cls, config) -> list[str]:
    """Problems that would stop this metric, found before any sampling."""
    del config
    return []

  @abc.abstractmethod
  def compute(self, ctx: EvalContext) -> dict[str, float | int | None]:
    """The metric's numbers for ``ctx``."""


def _inception(ctx: EvalContext) -> dict:
  from dfm_jax.evaluation import fid_features  # pylint: disable=g-import-not-at-top

  def run():
    real = None if _ref_cached(ctx.ref_key) else ctx.real()
    return fid_features.compute_metrics(
      ctx.fake,
      real,
      ref_key=ctx.ref_key,
      batch_size=int(ctx.config.eval.inception_batch),
      progress=ctx.progress,
    )

  return ctx.cached("inception", run)


def _ref_cached(key: str | None) -> bool:
  from dfm_jax.evaluation import fid_features  # pylint: disable=g-import-not-at-top

  return key is not None and fid_features.reference_path(key).is_file()


@METRICS.register("fid")
class FID(Metric):
  """Frechet Inception Distance (pytorch-fid conventions, pool3 features); images only (videos:
  ``frame_fid``)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return not is_video(config)

  def compute(self, ctx):
    r = _inception(ctx)
    return {"fid": r["fid"], "num_fake": r["num_fake"], "num_real": r["num_real"]}


@METRICS.register("kid")
class KID(Metric):
  """Kernel Inception Distance (unbiased polynomial-kernel MMD^2 over subsets); images only
  (videos: ``frame_fid`` also gives ``frame_kid``)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return not is_video(config)

  def compute(self, ctx):
    r = _inception(ctx)
    return {"kid": r["kid"], "kid_std": r["kid_std"]}


@METRICS.register("is")
class InceptionScore(Metric):
  """Inception Score; ``None`` when the cached Inception weights lack the classifier; images
  only."""

  @classmethod
  def enabled(cls, config) -> bool:
    return not is_video(config)

  def compute(self, ctx):
    r = _inception(ctx)
    return {"is": r["is"], "is_std": r["is_std"]}


@METRICS.register("fdd")
class FDD(Metric):
  """Frechet distance in DINOv2 features (FD-DINOv2, Stein et al. 2023), with the official
  checkpoint given as ``eval.fdd_weights`` (ViT-S/B/L/14, detected from the file)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.fdd_weights) and not is_video(config)

  @classmethod
  def check_config(cls, config) -> list[str]:
    path = storage.local_copy(config.eval.fdd_weights, "eval.fdd_weights")
    if path and not os.path.isfile(path):
      return [
        f"eval.fdd_weights: file {path!r} does not exist (an official DINOv2 checkpoint, "
        "e.g. dinov2_vitl14_pretrain.pth)"
      ]
    if path:  # read now (host memory, seconds), not after the sampling
      from dfm_jax.evaluation import dinov2  # pylint: disable=g-import-not-at-top

      problem = dinov2.checkpoint_problem(path)
      return [f"eval.fdd_weights: {problem}"] if problem else []
    return []

  def compute(self, ctx):
    from dfm_jax.evaluation import dinov2  # pylint: disable=g-import-not-at-top

    model = dinov2.load_dinov2(storage.local_copy(ctx.config.eval.fdd_weights, "eval.fdd_weights"))
    fake = dinov2.dinov2_features(model, ctx.fake)
    real = dinov2.dinov2_features(model, ctx.real())
    return {"fdd": dinov2.frechet_distance_of_features(fake, real)}


@METRICS.register("classifier")
class ClassifierScores(Metric):
  """A small classifier trained on the real training split (``eval.classifier`` names it, for
  28x28-class data): its accuracy on the conditioning labels and its Frechet distance. Images
  only; for moving-digits videos ``motion`` reports the per-frame accuracy."""

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.classifier) and not is_video(config)

  def compute(self, ctx):
    from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dfm_jax.evaluation import classifier as classifier_lib

    data = reference_data(ctx.config)
    n = data_lib.dataset_size(data)
    train_images, train_labels = data_lib.load_images(data, n, seed=0)
    clf = classifier_lib.get_classifier(ctx.config.eval.classifier, train_images, train_labels)
    return {
      "classifier_accuracy": float(clf.accuracy(ctx.fake, ctx.labels)),
      "classifier_fd": float(classifier_lib.classifier_frechet_distance(clf, ctx.fake, ctx.real())),
    }


# -------------------------------------------------------------------------------------------
# Video metrics. Video configs (``data.frames`` > 0) give ``ctx.fake`` and the reference clips
# as uint8 ``[N, T, H, W, C]``. The image metrics above (fid, kid, is, fdd, classifier) are
# disabled for them; ``frame_fid`` is the per-frame Inception FID/KID.


def is_video(config) -> bool:
  """Whether ``config`` generates videos (``data.frames`` > 0)."""
  return int(config.data.frames) > 0


def frame_indices(num_frames: int, keep: int) -> np.ndarray:
  """``keep`` frame indices spread evenly over ``[0, num_frames)`` (all frames when ``keep`` is
  0 or at least ``num_frames``): int ``[min(keep, T)]``, first and last frame included."""
  if keep <= 0 or keep >= num_frames:
    return np.arange(num_frames)
  return np.unique(np.round(np.linspace(0, num_frames - 1, keep)).astype(np.int64))


def video_frames(videos: np.ndarray, keep: int = 0) -> np.ndarray:
  """uint8 ``[N, T, H, W, C]`` -> the frames ``[N * K, H, W, C]`` (``K`` from
  :func:`frame_indices`), video by video."""
  v = np.asarray(videos)
  if v.ndim != 5:
    raise ValueError(f"expected videos [N, T, H, W, C], got shape {v.shape}")
  v = v[:, frame_indices(v.shape[1], keep)]
  return v.reshape((-1,) + v.shape[2:])


@METRICS.register("frame_fid")
class FrameFID(Metric):
  """Inception FID and KID over video frames: every clip contributes ``eval.frame_fid_frames``
  evenly spaced frames (0: all), generated and real alike; pytorch-fid conventions as ``fid``.
  The reference statistics are cached per (reference set, frames, frame choice)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return is_video(config)

  def compute(self, ctx):
    from dfm_jax.evaluation import fid_features  # pylint: disable=g-import-not-at-top

    keep = int(ctx.config.eval.frame_fid_frames)
    ref = reference_data(ctx.config)
    clip = (
      f"T{ctx.fake.shape[1]}s{ref.get('frame_stride', 1)}d{ref.get('num_digits', 1)}-frames{keep}"
    )
    key = None if ctx.ref_key is None else f"{ctx.ref_key}-{clip}"
    real = None if _ref_cached(key) else video_frames(ctx.real(), keep)
    r = fid_features.compute_metrics(
      video_frames(ctx.fake, keep),
      real,
      ref_key=key,
      batch_size=int(ctx.config.eval.inception_batch),
      progress=ctx.progress,
    )
    return {
      "frame_fid": r["fid"],
      "frame_kid": r["kid"],
      "frame_kid_std": r["kid_std"],
      "frame_fid_num_fake": r["num_fake"],
      "frame_fid_num_real": r["num_real"],
    }


def fvd_clips(videos: np.ndarray, frames: int = 16) -> np.ndarray:
  """Clips of exactly ``frames`` frames for FVD: ``[N, T, H, W, C]`` -> ``[N, frames, H, W, C]``.

  The first ``frames`` frames when T >= frames (the FVD-16 convention); shorter clips are
  resampled to ``frames`` by repeating frames (nearest neighbour in time), which I3D needs
  (T >= 9) but which is not the standard protocol: such FVDs compare only among themselves.
  """
  v = np.asarray(videos)
  t = v.shape[1]
  if t >= frames:
    return v[:, :frames]
  return v[:, (np.arange(frames) * t) // frames]


@METRICS.register("fvd")
class FVD(Metric):
  """Frechet Video Distance with the Kinetics-400 I3D (``eval.i3d_weights``: the user-supplied
  ``i3d_pretrained_400.pt`` state dict, see ``i3d.py``): logits of 16-frame clips (see
  :func:`fvd_clips`) resized to 224 px, generated vs real clips of the reference data."""

  @classmethod
  def enabled(cls, config) -> bool:
    return is_video(config) and bool(config.eval.i3d_weights)

  @classmethod
  def check_config(cls, config) -> list[str]:
    path = storage.local_copy(config.eval.i3d_weights, "eval.i3d_weights")
    if path and not os.path.isfile(path):
      return [
        f"eval.i3d_weights: file {path!r} does not exist (the Kinetics-400 I3D state "
        "dict i3d_pretrained_400.pt)"
      ]
    return []

  def compute(self, ctx):
    from dfm_jax.evaluation import i3d  # pylint: disable=g-import-not-at-top

    model = i3d.load_i3d(storage.local_copy(ctx.config.eval.i3d_weights, "eval.i3d_weights"))
    batch = int(ctx.config.eval.i3d_batch)
    fake = i3d.i3d_features(model, fvd_clips(ctx.fake, i3d.NUM_FRAMES), batch)
    real = i3d.i3d_features(model, fvd_clips(ctx.real(), i3d.NUM_FRAMES), batch)
    return {
      "fvd": float(i3d.fvd_from_features(fake, real)),
      "fvd_num_fake": len(fake),
      "fvd_num_real": len(real),
      "fvd_source_frames": int(ctx.fake.shape[1]),
    }


def digit_classifier(config):
  """The MNIST digit classifier named ``eval.classifier`` (default ``mnist5k``), trained on the
  5,000 embedded digits padded to 32x32 (the same weights and cache as the image configs')."""
  from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dfm_jax.evaluation import classifier as classifier_lib  # pylint: disable=g-import-not-at-top

  digits = data_lib.default_data_config()  # mnist5k at 32 px, padded
  images, labels = data_lib.load_images(digits, data_lib.dataset_size(digits), seed=0)
  return classifier_lib.get_classifier(config.eval.classifier or "mnist5k", images, labels)


@METRICS.register("motion")
class MotionScores(Metric):
  """Moving digits only (``motion.py``): the fraction of generated frames whose digit the MNIST
  classifier reads as the conditioning label (``frame_accuracy``; ``real_frame_accuracy`` on the
  reference clips for scale) and the centre-of-mass motion statistics against the reference
  clips (``speed_ratio`` and ``roughness_ratio`` near 1 and small ``*_w1`` are faithful)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return is_video(config) and reference_data(config).get("source", "") == "moving_digits"

  @classmethod
  def check_config(cls, config) -> list[str]:
    if cls.enabled(config) and int(config.data.frames) < 3:
      return [
        f"eval.metrics: 'motion' needs clips of at least 3 frames, data.frames is "
        f"{config.data.frames}"
      ]
    return []

  def compute(self, ctx):
    from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dfm_jax.evaluation import motion  # pylint: disable=g-import-not-at-top

    out = motion.motion_consistency(ctx.fake, ctx.real())
    if ctx.fake.shape[-1] != 1:
      return out
    clf = ctx.cached("digit_classifier", lambda: digit_classifier(ctx.config))
    out["frame_accuracy"] = motion.per_frame_accuracy(clf, ctx.fake, ctx.labels)["accuracy"]
    real, labels = data_lib.load_images(
      reference_data(ctx.config), len(ctx.real()), split=ctx.config.eval.real_split, seed=1
    )
    out["real_frame_accuracy"] = motion.per_frame_accuracy(clf, real, labels)["accuracy"]
    return out


def reference_data(config):
  """The data block of the reference pictures: ``eval.reference`` when its source is set (needed
  for latent runs), else the training data."""
  ref = config.eval.reference
  if ref.source:
    return ref
  return config.data


def active_metrics(config) -> list[Metric]:
  """Instances of the enabled metrics of ``config.eval.metrics``, in order."""
  return [METRICS.get(name)() for name in config.eval.metrics if METRICS.get(name).enabled(config)]


def check_metrics_config(config) -> list[str]:
  """Problems with ``eval.metrics`` and their settings (unknown names, missing weights)."""
  problems = []
  for name in config.eval.metrics:
    try:
      cls = METRICS.get(name)
    except ValueError as err:
      problems.append(f"eval.metrics: {err}")
      continue
    problems.extend(cls.check_config(config))
  return problems


def evaluate(ctx: EvalContext, metrics: list[Metric]) -> dict[str, Any]:
  """Runs ``metrics`` on ``ctx``; one dict of all their numbers."""
  out: dict[str, Any] = {}
  for metric in metrics:
    out.update(metric.compute(ctx))
  return out
