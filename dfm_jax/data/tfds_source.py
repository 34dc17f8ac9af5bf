"""TFDS datasets through `tfds.data_source` (ArrayRecord random access, no TensorFlow needed).

Image features are read as encoded bytes and decoded with PIL here, so an unreadable record
can be named by its index and skipped.
"""

from __future__ import annotations

import os

import numpy as np

from dfm_jax import storage
from dfm_jax.data.transforms import decode_image
from dfm_jax.data.transforms import to_channels


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def dataset_info(name: str, data_dir: str | None):
  """DatasetInfo of a prepared dataset; ValueError when it is not under `data_dir`."""
  tfds = _tfds()
  root = os.fspath(data_dir) if data_dir else tfds.core.constants.DATA_DIR
  base = name.split(":")[0].split("/")[0]
  # Without local files tfds.builder would fall back to fetching metadata over the network.
  if not storage.is_remote(root) and not os.path.isdir(os.path.join(root, base)):
    raise ValueError(
      f"tfds dataset {name!r} is not prepared under data_dir {root!r} "
      f"(no folder {base!r}); build it first, e.g. `tfds build {base} "
      f"--data_dir {root}`"
    )
  try:
    return tfds.builder(name, data_dir=root).info
  except Exception as err:  # tfds raises several unrelated types for a bad name or folder
    raise ValueError(
      f"cannot open tfds dataset {name!r} in {root!r}: {str(err).splitlines()[0]}"
    ) from err


class TfdsRecords:
  """Random access to (uint8 [H, W, C] image, int label) records of a tfds split."""

  def __init__(
    self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str, channels: int
  ):
    tfds = _tfds()
    root = os.fspath(data_dir) if data_dir else tfds.core.constants.DATA_DIR
    builder = tfds.builder(name, data_dir=root)
    self._encoded = isinstance(builder.info.features[image_key], tfds.features.Image)
    decoders = {image_key: tfds.decode.SkipDecoding()} if self._encoded else None
    self._records = builder.as_data_source(split=split, decoders=decoders)
    self.name, self.split = name, split
    self._image_key, self._label_key, self._channels = image_key, label_key, channels

  def __len__(self) -> int:
    return len(self._records)

  def record_name(self, index: int) -> str:
    return f"tfds {self.name!r} split {self.split!r} record {index}"

  def load(self, index: int) -> tuple[np.ndarray, int]:
    record = self._records[index]
    image = record[self._image_key]
    if self._encoded:
      image = decode_image(image, self._channels)
    else:
      image = np.asarray(image)
      image = to_channels(image if image.ndim == 3 else image[..., None], self._channels)
    label = int(record[self._label_key]) if self._label_key else 0
    return image, label
