"""Input pipeline: Grain iterators over the registered sources (`SOURCES`: MNIST-5k, idx files,
image folders, TFDS datasets, precomputed latents), configured by the `data` ConfigDict block
(see `default_data_config`)."""

from dfm_jax.data.arrays import load_idx
from dfm_jax.data.arrays import load_idx_dataset
from dfm_jax.data.arrays import load_latents
from dfm_jax.data.arrays import load_mnist5k
from dfm_jax.data.arrays import mnist5k_path
from dfm_jax.data.config import default_data_config
from dfm_jax.data.pipeline import dataset_size
from dfm_jax.data.pipeline import load_images
from dfm_jax.data.pipeline import make_train_iterator
from dfm_jax.data.sources import SOURCES
from dfm_jax.data.corrupt import CorruptRecordError
from dfm_jax.data.sources import DataSource
from dfm_jax.data.sources import open_source
from dfm_jax.data.sources import source_class
from dfm_jax.data.sources import validate_data_config
from dfm_jax.data.corrupt import skipped_records
from dfm_jax.data.transforms import center_crop
from dfm_jax.data.transforms import pad_to

__all__ = [
  "SOURCES",
  "CorruptRecordError",
  "DataSource",
  "open_source",
  "source_class",
  "center_crop",
  "dataset_size",
  "default_data_config",
  "load_idx",
  "load_idx_dataset",
  "load_images",
  "load_latents",
  "load_mnist5k",
  "make_train_iterator",
  "mnist5k_path",
  "pad_to",
  "skipped_records",
  "validate_data_config",
]
