"""Sample-quality metrics, registered by name in :data:`METRICS` and chosen by
``config.eval.metrics``.

Every metric reads an :class:`EvalContext` (the generated pictures, their labels, the reference
pictures and a cache shared between metrics, so FID, KID and IS run Inception once) and returns a
dict of numbers. A metric that does not apply to a config (FDD without DINOv2 weights, the
classifier measures without a classifier) says so in ``enabled`` and is left out.

Add one with ``@METRICS.register("name")`` on a :class:`Metric` subclass; video metrics (FVD,
per-frame FID) plug in the same way.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Callable

import numpy as np

from dfm_jax.registry import Registry

METRICS: Registry = Registry("metric")


@dataclasses.dataclass
class EvalContext:
  """What the metrics of one evaluation share.

  Attributes:
    config: the run's config (``eval`` block: weights, classifier, batch sizes).
    fake: uint8 generated pictures ``[N, H, W, C]``.
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
    return fid_features.compute_metrics(ctx.fake, real, ref_key=ctx.ref_key,
                                        batch_size=int(ctx.config.eval.get("inception_batch", 50)),
                                        progress=ctx.progress)

  return ctx.cached("inception", run)


def _ref_cached(key: str | None) -> bool:
  from dfm_jax.evaluation import fid_features  # pylint: disable=g-import-not-at-top

  return key is not None and fid_features.reference_path(key).is_file()


@METRICS.register("fid")
class FID(Metric):
  """Frechet Inception Distance (pytorch-fid conventions, pool3 features)."""

  def compute(self, ctx):
    r = _inception(ctx)
    return {"fid": r["fid"], "num_fake": r["num_fake"], "num_real": r["num_real"]}


@METRICS.register("kid")
class KID(Metric):
  """Kernel Inception Distance (unbiased polynomial-kernel MMD^2 over subsets)."""

  def compute(self, ctx):
    r = _inception(ctx)
    return {"kid": r["kid"], "kid_std": r["kid_std"]}


@METRICS.register("is")
class InceptionScore(Metric):
  """Inception Score; ``None`` when the cached Inception weights lack the classifier."""

  def compute(self, ctx):
    r = _inception(ctx)
    return {"is": r["is"], "is_std": r["is_std"]}


@METRICS.register("fdd")
class FDD(Metric):
  """Frechet distance in DINOv2 features (FD-DINOv2, Stein et al. 2023), with the official
  checkpoint given as ``eval.fdd_weights`` (ViT-S/B/L/14, detected from the file)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.get("fdd_weights", ""))

  @classmethod
  def check_config(cls, config) -> list[str]:
    path = config.eval.get("fdd_weights", "")
    if path and not os.path.isfile(path):
      return [f"eval.fdd_weights: file {path!r} does not exist (an official DINOv2 checkpoint, "
              "e.g. dinov2_vitl14_pretrain.pth)"]
    return []

  def compute(self, ctx):
    from dfm_jax.evaluation import dinov2  # pylint: disable=g-import-not-at-top

    model = dinov2.load_dinov2(ctx.config.eval.fdd_weights)
    fake = dinov2.dinov2_features(model, ctx.fake)
    real = dinov2.dinov2_features(model, ctx.real())
    return {"fdd": dinov2.frechet_distance_of_features(fake, real)}


@METRICS.register("classifier")
class ClassifierScores(Metric):
  """A small classifier trained on the real training split (``eval.classifier`` names it, for
  28x28-class data): its accuracy on the conditioning labels and its Frechet distance."""

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.get("classifier", ""))

  def compute(self, ctx):
    from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dfm_jax.evaluation import classifier as classifier_lib  # pylint: disable=g-import-not-at-top

    data = reference_data(ctx.config)
    n = data_lib.dataset_size(data)
    train_images, train_labels = data_lib.load_images(data, n, seed=0)
    clf = classifier_lib.get_classifier(ctx.config.eval.classifier, train_images, train_labels)
    return {"classifier_accuracy": float(clf.accuracy(ctx.fake, ctx.labels)),
            "classifier_fd": float(classifier_lib.classifier_frechet_distance(
                clf, ctx.fake, ctx.real()))}


def reference_data(config):
  """The data block of the reference pictures: ``eval.reference`` when its source is set (needed
  for latent runs), else the training data."""
  ref = config.eval.get("reference", None)
  if ref is not None and ref.get("source", ""):
    return ref
  return config.data


def active_metrics(config) -> list[Metric]:
  """Instances of the enabled metrics of ``config.eval.metrics``, in order."""
  return [METRICS.get(name)() for name in config.eval.metrics
          if METRICS.get(name).enabled(config)]


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
