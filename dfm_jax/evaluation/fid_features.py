"""Inception features and FID / KID / IS for uint8 images, with pytorch-fid's conventions.

Preprocessing, as pytorch-fid does it:

1. uint8 images ``[N, H, W, 3]``; grayscale ``[N, H, W]`` or ``[N, H, W, 1]`` is repeated to three
   channels, and a fourth (alpha) channel is dropped, like PIL's ``convert("RGB")``.
2. float32, bilinear resize to 299x299 with half-pixel centres and no antialiasing
   (``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``); images already
   299x299 are left as they are.
3. ``x / 127.5 - 1`` (pytorch-fid's ``2 * (x / 255) - 1``).

Features are pool3 activations ``[N, 2048]`` and, when the weights include the classifier,
the 1008-way logits without bias, the layer the reference Inception Score uses.

Reference statistics of a real data set are cached under a caller-given key (for example
``"cifar10-train-32"``: data set plus resolution) as ``<cache>/fid_stats/<key>.npz`` holding
``mu`` ``[2048]``, ``sigma`` ``[2048, 2048]`` (float64) and the pool3 ``features`` (float32, kept
for KID; about 8 KiB per image).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax import storage
from dfm_jax.evaluation import inception, metrics, weights

__all__ = [
  "INCEPTION_SIZE",
  "to_rgb_uint8",
  "preprocess",
  "inception_params",
  "extract_features",
  "reference_statistics",
  "compute_metrics",
]

INCEPTION_SIZE = 299
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def to_rgb_uint8(images: np.ndarray, batched: bool = True) -> np.ndarray:
  """uint8 ``[N, H, W]``, ``[N, H, W, 1|3|4]`` (or one image without N) -> ``[..., H, W, 3]``."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
  gray_ndim = 3 if batched else 2
  if images.ndim == gray_ndim:
    images = images[..., None]
  if images.ndim != gray_ndim + 1 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"expected {'[N, ' if batched else '['}H, W, C] images with C in "
      f"1, 3, 4; got shape {images.shape}"
    )
  if images.shape[-1] == 1:
    return np.repeat(images, 3, axis=-1)
  return images[..., :3]


@jax.jit
def preprocess(images: jax.Array) -> jax.Array:
  """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 299, 299, 3]`` in ``[-1, 1]``."""
  x = images.astype(jnp.float32)
  n, h, w, c = x.shape
  if (h, w) != (INCEPTION_SIZE, INCEPTION_SIZE):
    x = jax.image.resize(
      x, (n, INCEPTION_SIZE, INCEPTION_SIZE, c), method="linear", antialias=False
    )
  return x / 127.5 - 1.0


@jax.jit
def _network(params, x: jax.Array):
  return inception.inception_v3(params, x, logits_bias=False)


@functools.lru_cache(maxsize=4)
def _load_cached_params(path: str, mtime: float) -> dict:
  return inception.load_params(path)


def inception_params() -> dict:
  """The cached Inception weights; raises with the fetch command when they are missing."""
  path = weights.weights_path()
  if not path.is_file():
    raise FileNotFoundError(
      f"FID Inception weights not found at {path}; run `{weights.FETCH_COMMAND}` first"
    )
  return _load_cached_params(str(path), path.stat().st_mtime)


def _preprocessed_batches(images, batch_size: int):
  """Yield float32 ``[b, 299, 299, 3]`` batches from an array or a list of images."""
  if isinstance(images, np.ndarray):
    rgb = to_rgb_uint8(images)
    for start in range(0, rgb.shape[0], batch_size):
      yield preprocess(rgb[start : start + batch_size])
    return
  for start in range(0, len(images), batch_size):
    chunk = [
      preprocess(to_rgb_uint8(im, batched=False)[None]) for im in images[start : start + batch_size]
    ]
    yield jnp.concatenate(chunk, axis=0)


def extract_features(images_uint8, batch_size: int = 50, params=None, progress: bool = False):
  """Inception pool3 features and logits of uint8 images.

  Args:
    images_uint8: uint8 array ``[N, H, W(, C)]``, or a sequence of ``[H, W(, C)]`` arrays whose
      sizes may differ.
    batch_size: images per network call; the last batch is zero-padded so that every call has
      the same shape.
    params: Inception params (default: the cached weights, see :func:`inception_params`).
    progress: report progress on stderr.

  Returns:
    ``(pool, logits)``: float32 ``[N, 2048]`` and ``[N, 1008]`` (logits without bias), or
    ``None`` for the logits when the weights lack the classifier.
  """
  if not isinstance(images_uint8, np.ndarray):
    images_uint8 = (
      list(images_uint8) if isinstance(images_uint8, Sequence) else np.asarray(images_uint8)
    )
  n = len(images_uint8)
  if n == 0:
    raise ValueError("no images given")
  params = inception_params() if params is None else params
  batch = max(1, min(batch_size, n))
  pools, logits, done = [], [], 0
  for x in _preprocessed_batches(images_uint8, batch):
    b = x.shape[0]
    if b < batch:
      x = jnp.concatenate([x, jnp.zeros((batch - b,) + x.shape[1:], x.dtype)], axis=0)
    pool, logit = _network(params, x)
    pools.append(np.asarray(pool[:b]))
    if logit is not None:
      logits.append(np.asarray(logit[:b]))
    done += b
    if progress:
      print(f"inception features: {done}/{n}", file=sys.stderr, flush=True)
  return np.concatenate(pools), (np.concatenate(logits) if logits else None)


def reference_path(key: str) -> Path:
  """Where the reference statistics cached under ``key`` live."""
  if not _KEY_PATTERN.match(key):
    raise ValueError(f"reference key {key!r} must match {_KEY_PATTERN.pattern}")
  return storage.cache_dir() / "fid_stats" / f"{key}.npz"


def reference_statistics(key: str, real_uint8=None, batch_size: int = 50, params=None) -> dict:
  """Cached pool3 statistics of a real data set.

  Loads ``<cache>/fid_stats/<key>.npz`` if present (``real_uint8`` is then not used); otherwise
  computes them from ``real_uint8`` and writes the file.

  Returns:
    dict with ``mu`` ``[2048]``, ``sigma`` ``[2048, 2048]``, ``features`` ``[N, 2048]``, ``num``.
  """
  path = reference_path(key)
  if path.is_file():
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in ("mu", "sigma", "features")} | {"num": int(data["num"])}
  if real_uint8 is None:
    raise FileNotFoundError(f"no cached reference statistics {path}; pass the real images")
  features, _ = extract_features(real_uint8, batch_size, params)
  mu, sigma = metrics.feature_statistics(features)
  with storage.atomic_path(path) as tmp:
    np.savez(os.fspath(tmp), mu=mu, sigma=sigma, features=features, num=np.int64(len(features)))
  return {"mu": mu, "sigma": sigma, "features": features, "num": len(features)}


def compute_metrics(
  fake_uint8,
  real_uint8=None,
  ref_key: str | None = None,
  batch_size: int = 50,
  kid_subsets: int = 100,
  kid_subset_size: int = 1000,
  is_splits: int = 10,
  params=None,
  progress: bool = False,
) -> dict:
  """FID, KID and Inception Score of generated images against real ones.

  Args:
    fake_uint8: generated images (see :func:`extract_features` for accepted layouts).
    real_uint8: real images, or ``None`` when ``ref_key`` names cached statistics.
    ref_key: cache key of the real set's statistics (computed from ``real_uint8`` on first use).
    kid_subsets, kid_subset_size: KID subsets (the size is capped by both set sizes).
    is_splits: Inception Score splits (capped by the number of fake images).
    batch_size, params, progress: as for :func:`extract_features`.

  Returns:
    ``{"fid", "kid", "kid_std", "is", "is_std", "num_fake", "num_real"}``; metrics that cannot
    be computed are ``None``: FID/KID without real data, IS without the classifier weights.
  """
  params = inception_params() if params is None else params
  fake_pool, fake_logits = extract_features(fake_uint8, batch_size, params, progress)
  out = {
    "fid": None,
    "kid": None,
    "kid_std": None,
    "is": None,
    "is_std": None,
    "num_fake": int(len(fake_pool)),
    "num_real": None,
  }
  if fake_logits is not None:
    out["is"], out["is_std"] = metrics.inception_score(
      fake_logits, min(is_splits, len(fake_logits))
    )
  if ref_key is not None:
    ref = reference_statistics(ref_key, real_uint8, batch_size, params)
  elif real_uint8 is not None:
    real_pool, _ = extract_features(real_uint8, batch_size, params, progress)
    mu, sigma = metrics.feature_statistics(real_pool)
    ref = {"mu": mu, "sigma": sigma, "features": real_pool, "num": len(real_pool)}
  else:
    return out
  out["num_real"] = int(ref["num"])
  out["fid"] = metrics.frechet_distance(
    *metrics.feature_statistics(fake_pool), ref["mu"], ref["sigma"]
  )
  out["kid"], out["kid_std"] = metrics.kernel_inception_distance(
    fake_pool, ref["features"], kid_subsets, kid_subset_size
  )
  return out
