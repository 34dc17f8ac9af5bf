"""Training iterator, real-image samples and dataset size for a `data` config."""

from __future__ import annotations

import dataclasses

from absl import flags
import grain
import numpy as np

from dfm_jax.data.config import get
from dfm_jax.data.sources import validate_data_config
from dfm_jax.data.sources import ArraySource
from dfm_jax.data.sources import open_source
from dfm_jax.data.transforms import to_unit_range


@dataclasses.dataclass(frozen=True)
class _RandomFlip(grain.transforms.RandomMap):
  """Mirrors the [H, W, C] image or the whole [T, H, W, C] clip left-right (the width axis,
  -2 in both) with probability 1/2 when enabled."""

  enabled: bool

  def random_map(self, element, rng: np.random.Generator):
    if self.enabled and rng.random() < 0.5:
      element = {**element, "image": element["image"][..., ::-1, :]}
    return element


@dataclasses.dataclass(frozen=True)
class _ToModelRange(grain.transforms.Map):
  """Batch of uint8 images -> float32 in [-1, 1]; latents -> float32 times `latent_scale`."""

  pixels: bool
  latent_scale: float

  def map(self, batch):
    image = batch["image"]
    if self.pixels:
      image = to_unit_range(image)
    else:
      image = image.astype(np.float32) * np.float32(self.latent_scale)
    return {"image": image, "label": batch["label"]}


def _read_options(source, num_workers: int) -> grain.ReadOptions:
  # Buffers hold whole local batches; decoding threads help only when PIL does the work.
  if isinstance(source, ArraySource) or not source.pixels:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  threads = 4 if num_workers else 8
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def make_train_iterator(
  data, *, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
  """Infinite, checkpointable (`get_state`/`set_state`) iterator of this process's batches.

  Yields {'image': float32 [L, H, W, C] in [-1, 1] (videos: [L, T, H, W, C]; latents: scaled
  by data.latent_scale, unclipped), 'label': int32 [L]} with L = global_batch_size //
  process_count. For a given seed, process p's batch k equals rows [p*L, (p+1)*L) of batch k
  of the process_count=1 iterator, whatever num_workers is. Each epoch is reshuffled.
  """
  validate_data_config(data)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index} must lie in [0, process_count={process_count})"
    )
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple of "
      f"process_count={process_count}"
    )
  local_batch = global_batch_size // process_count
  source = open_source(data)
  shuffle_seed, flip_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  # Flip randomness is keyed by the global position, so sharding cannot change it.
  ds = ds.random_map(_RandomFlip(bool(get(data, "random_flip"))), seed=flip_seed)
  # Consecutive chunks of L rows: process p takes chunks p, p + P, p + 2P, ... (P processes),
  # i.e. rows [p*L, (p+1)*L) of each global batch.
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  num_workers = get(data, "num_workers")
  it = ds.to_iter_dataset(_read_options(source, num_workers))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # Grain reads its absl flags when it starts workers; outside absl.app nothing has
      # parsed them and the read fails, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  # Scaling after the workers sends uint8 (4x smaller) batches between processes.
  it = it.map(_ToModelRange(source.pixels, float(get(data, "latent_scale"))))
  return iter(it)


def load_images(
  data, num: int, *, split: str | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic sample of `num` distinct records as real images, cropped as for training,
  not flipped (with data.skip_corrupt an unreadable record repeats its successor).

  Returns images uint8 [num, H, W, C] (video sources: clips [num, T, H, W, C]) and labels
  int32 [num]; `split` (tfds, moving_digits) overrides data.split.
  """
  validate_data_config(data)
  if get(data, "source") == "latents":
    raise ValueError(
      "data.source='latents' holds no pixels; FID reference statistics and "
      "classifiers need pixel data (a 'folder', 'tfds', 'idx' or 'mnist5k' "
      "source)"
    )
  source = open_source(data, split)
  n = len(source)
  if not 0 < num <= n:
    raise ValueError(f"load_images: num={num} must lie in [1, {n}] (dataset size)")
  order = np.random.default_rng(seed).permutation(n)[:num]
  if isinstance(source, ArraySource):
    images, labels = source.arrays()
    return images[order], labels[order]
  ds = grain.MapDataset.range(num).map(lambda k: source[int(order[k])])
  elements = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=32)))
  return (
    np.stack([e["image"] for e in elements]),
    np.array([e["label"] for e in elements], np.int32),
  )


def dataset_size(data) -> int:
  """Number of records in data.split (before any skipping of corrupt records)."""
  validate_data_config(data)
  return len(open_source(data))
