"""A small CNN classifier for 32x32 grayscale data (MNIST, Fashion-MNIST) used as a metric network.

Images everywhere are uint8 in [0, 255] with shape [N, 32, 32, 1] (28x28 sources padded with two
black pixels on each side). Inside the network they are scaled to [-1, 1].

`get_classifier(name, images, labels)` trains the network once (fixed seed, fixed data order,
Adam) and caches the weights as ``$DFM_JAX_CACHE/classifier/<name>.npz`` (default cache dir
``~/.cache/dfm_jax``); later calls with the same name load them. The cache file records a hash of
the training data, and a call whose data differs from the cached run raises instead of silently
reusing or overwriting the weights.

`Classifier.features` gives the penultimate activations [N, 128], which
`classifier_frechet_distance` turns into a Frechet distance between two image sets.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfm_jax import storage
from dfm_jax.evaluation.metrics import feature_statistics, frechet_distance

IMAGE_SHAPE = (32, 32, 1)
NUM_CLASSES = 10
FEATURE_DIM = 128
# Bump when the architecture or the training recipe changes, so stale caches are rejected.
_RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training recipe: Adam with cosine decay, random +-2 pixel shifts, fixed seed and order.

  `epochs=None` aims at `target_steps` optimizer steps, clipped to [min_epochs, max_epochs]:
  10 epochs for the 5k MNIST digits, 3 for the 60k Fashion-MNIST training split.
  """

  seed: int = 0
  batch_size: int = 128
  learning_rate: float = 3e-3
  max_shift: int = 2
  epochs: int | None = None
  target_steps: int = 1400
  min_epochs: int = 3
  max_epochs: int = 10

  def num_epochs(self, num_examples: int) -> int:
    if self.epochs is not None:
      return self.epochs
    steps_per_epoch = max(1, num_examples // self.batch_size)
    wanted = -(-self.target_steps // steps_per_epoch)
    return min(self.max_epochs, max(self.min_epochs, wanted))


class SmallCNN(nnx.Module):
  """Three stride-2 3x3 convs (32 -> 4 pixels), a 128-d hidden layer, 10 logits."""

  def __init__(self, *, rngs: nnx.Rngs):
    # Strided convs rather than max-pooling: pooling gradients are very slow on XLA:CPU.
    self.conv1 = nnx.Conv(1, 32, (3, 3), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
    self.conv3 = nnx.Conv(64, 64, (3, 3), strides=2, rngs=rngs)
    self.hidden = nnx.Linear(4 * 4 * 64, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """x: [B, 32, 32, 1] float in [-1, 1] -> [B, 128]."""
    for conv in (self.conv1, self.conv2, self.conv3):
      x = nnx.relu(conv(x))
    # A smooth activation keeps every feature dimension alive (no all-zero ReLU units),
    # so the feature covariance used by the Frechet distance is well conditioned.
    return nnx.silu(self.hidden(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, 32, 32, 1] float in [-1, 1] -> logits [B, 10]."""
    return self.head(self.features(x))


def _to_float(images_uint8: jax.Array) -> jax.Array:
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(
      f"expected uint8 images of shape [N, 32, 32, 1], got {images.dtype} {images.shape}"
    )
  return images


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(graphdef: nnx.GraphDef, state: nnx.State, images_uint8: jax.Array, what: str):
  model = nnx.merge(graphdef, state)
  x = _to_float(images_uint8)
  if what == "features":
    return model.features(x)
  return jnp.argmax(model(x), axis=-1)


class Classifier:
  """A trained `SmallCNN`; every method takes uint8 images [N, 32, 32, 1]."""

  def __init__(self, model: SmallCNN, batch_size: int = 500):
    self.graphdef, self.state = nnx.split(model)
    self.batch_size = batch_size

  def _batched(self, images: np.ndarray, what: str) -> np.ndarray:
    images = _check_images(images)
    n, b = len(images), self.batch_size
    outs = []
    for start in range(0, n, b):
      chunk = images[start : start + b]
      # Pad the tail to a full batch so one compiled program serves every call.
      padded = np.concatenate([chunk, np.zeros((b - len(chunk), *IMAGE_SHAPE), np.uint8)])
      outs.append(np.asarray(_apply(self.graphdef, self.state, padded, what))[: len(chunk)])
    if not outs:
      shape = (0, FEATURE_DIM) if what == "features" else (0,)
      return np.zeros(shape, np.float32 if what == "features" else np.int32)
    return np.concatenate(outs)

  def features(self, images_uint8: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 1] uint8 -> penultimate activations [N, 128] float32."""
    return self._batched(images_uint8, "features")

  def predict(self, images_uint8: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 1] uint8 -> predicted labels [N] int32."""
    return self._batched(images_uint8, "predict")

  def accuracy(self, images_uint8: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `images_uint8` [N, 32, 32, 1] whose prediction equals `labels` [N]."""
    return float(np.mean(self.predict(images_uint8) == np.asarray(labels)))


def _shift(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
  """Translate each image [B, 32, 32, 1] by up to `max_shift` pixels, filling with black."""
  b = len(images)
  m = max_shift
  padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
  dy, dx = rng.integers(0, 2 * m + 1, size=(2, b))
  rows = dy[:, None] + np.arange(32)[None, :]
  cols = dx[:, None] + np.arange(32)[None, :]
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_classifier(
  images_uint8: np.ndarray, labels: np.ndarray, config: TrainConfig = TrainConfig()
) -> SmallCNN:
  """Train a `SmallCNN` on images [N, 32, 32, 1] uint8 and labels [N] (deterministic).

  Each epoch visits a fixed permutation of the data (seeded by `config.seed` and the epoch);
  the last partial batch of an epoch is dropped so every step has the same shape.
  """
  images = _check_images(images_uint8)
  labels = np.asarray(labels, np.int32)
  if len(labels) != len(images) or len(images) < config.batch_size:
    raise ValueError(f"need >= {config.batch_size} images with one label each")
  model = SmallCNN(rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  steps_per_epoch = len(images) // config.batch_size
  total_steps = steps_per_epoch * config.num_epochs(len(images))
  tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, total_steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x_uint8, y):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(_to_float(x_uint8))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for epoch in range(config.num_epochs(len(images))):
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(images))
    for i in range(steps_per_epoch):
      idx = order[i * config.batch_size : (i + 1) * config.batch_size]
      batch = _shift(images[idx], rng, config.max_shift)
      params, opt_state = step(params, opt_state, batch, labels[idx])
  return nnx.merge(graphdef, params)


def _fingerprint(images: np.ndarray, labels: np.ndarray, config: TrainConfig) -> str:
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(images).tobytes())
  h.update(np.ascontiguousarray(labels, np.int64).tobytes())
  h.update(json.dumps([_RECIPE_VERSION, dataclasses.asdict(config)]).encode())
  return h.hexdigest()


def _key(path) -> str:
  return "/".join(str(k.key) for k in path)


def _save(path: Path, model: SmallCNN, fingerprint: str) -> None:
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  arrays = {_key(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(pure)}
  with storage.atomic_path(path) as tmp:
    np.savez(os.fspath(tmp), __fingerprint__=np.array(fingerprint), **arrays)


def _load(path: Path, fingerprint: str) -> SmallCNN:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: SmallCNN(rngs=nnx.Rngs(0))))
  pure = nnx.to_pure_dict(state)
  expected = {_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)}
  with np.load(path) as data:
    if str(data["__fingerprint__"]) != fingerprint:
      raise ValueError(
        f"{path} was trained on different data or with another recipe; pass another "
        "name or delete the file to retrain"
      )
    if set(data.files) - {"__fingerprint__"} != expected:
      raise ValueError(f"{path} does not hold SmallCNN weights")
    pure = jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(data[_key(p)]), pure)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def get_classifier(
  name: str,
  train_images_uint8: np.ndarray,
  train_labels: np.ndarray,
  config: TrainConfig = TrainConfig(),
) -> Classifier:
  """Load the cached classifier `name`, or train it on the given split and cache it.

  Args:
    name: cache key, e.g. ``"mnist"`` or ``"fashion_mnist"`` ([A-Za-z0-9_.-]).
    train_images_uint8: [N, 32, 32, 1] uint8 training images.
    train_labels: [N] integer labels in [0, 10).
  """
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise ValueError(f"invalid classifier name {name!r}")
  images = _check_images(train_images_uint8)
  labels = np.asarray(train_labels)
  fingerprint = _fingerprint(images, labels, config)
  path = storage.cache_dir() / "classifier" / f"{name}.npz"
  if path.exists():
    return Classifier(_load(path, fingerprint))
  model = train_classifier(images, labels, config)
  _save(path, model, fingerprint)
  return Classifier(model)


def classifier_frechet_distance(
  clf: Classifier, fake_uint8: np.ndarray, real_uint8: np.ndarray
) -> float:
  """Frechet distance between Gaussians fitted to `clf` features of fake and real images.

  Both inputs are uint8 [N, 32, 32, 1]; use a few thousand images per side for stable numbers.
  """
  mu_f, sigma_f = feature_statistics(clf.features(fake_uint8))
  mu_r, sigma_r = feature_statistics(clf.features(real_uint8))
  return float(frechet_distance(mu_f, sigma_f, mu_r, sigma_r))
