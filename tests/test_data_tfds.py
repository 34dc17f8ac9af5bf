"""The 'tfds' source on an ArrayRecord dataset built here without TensorFlow.

tfds encodes numpy images with TensorFlow, so the builder hands it PIL images (encoded with
PIL) and, for the corrupt record, raw bytes (stored as they are).
"""

import numpy as np
import pytest
from PIL import Image

from dfm_jax import data as D

import tensorflow_datasets as tfds  # noqa: E402

# (height, width, label); record 3 holds bytes that are not an image.
_RECORDS = [(12, 20, 0), (16, 16, 1), (20, 12, 2), None, (9, 30, 1), (14, 14, 0)]
_CORRUPT_INDEX = 3


def _colour(label):
  return np.array([60 * label + 10, 200 - 50 * label, 33], np.uint8)


class DfmTestImages(tfds.core.GeneratorBasedBuilder):
  """Six variable-size RGB images, one per record in order, plus one corrupt record."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, rec in enumerate(_RECORDS):
      if rec is None:
        yield i, {"image": b"\x89PNG but not really", "label": 0}
        continue
      h, w, label = rec
      image = np.broadcast_to(_colour(label), (h, w, 3)).copy()
      yield i, {"image": Image.fromarray(image), "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  DfmTestImages(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


def tfds_cfg(data_dir, **overrides):
  c = D.default_data_config()
  c.update(
    source="tfds",
    tfds_name="dfm_test_images",
    data_dir=data_dir,
    resolution=8,
    channels=3,
    crop="center",
    num_classes=3,
  )
  c.update(overrides)
  return c


def test_tfds_data_source_reads_cropped_images_and_labels(data_dir):
  c = tfds_cfg(data_dir, skip_corrupt=True)
  D.validate_data_config(c)
  assert D.dataset_size(c) == len(_RECORDS)
  batch = next(D.make_train_iterator(c, global_batch_size=6, seed=0))
  assert batch["image"].shape == (6, 8, 8, 3) and batch["image"].dtype == np.float32
  for image, label in zip(batch["image"], batch["label"]):
    expected = _colour(label).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(image, np.broadcast_to(expected, (8, 8, 3)), atol=1e-6)
  name = f"tfds 'dfm_test_images' split 'train' record {_CORRUPT_INDEX}"
  assert D.skipped_records()[name] >= 1


def test_tfds_corrupt_record_error_names_its_index(data_dir):
  with pytest.raises(D.CorruptRecordError, match=f"record {_CORRUPT_INDEX}"):
    D.load_images(tfds_cfg(data_dir), len(_RECORDS))


def test_tfds_validation_names_split_and_feature(data_dir):
  with pytest.raises(ValueError, match=r"data\.split: .*no split 'validation'"):
    D.validate_data_config(tfds_cfg(data_dir, split="validation"))
  with pytest.raises(ValueError, match=r"data\.image_key: .*no feature 'img'"):
    D.validate_data_config(tfds_cfg(data_dir, image_key="img"))
  with pytest.raises(ValueError, match=r"data\.num_classes: .*3 classes"):
    D.validate_data_config(tfds_cfg(data_dir, num_classes=2))
