"""Synthetic data, the stand-in autoencoder, and the runlocal variant's use of them."""

import numpy as np
import pytest

from dfm_jax import autoencoders, data as data_lib
from dfm_jax.data import sources
from tests.train_utils import config_file


def _data(**fields):
  d = data_lib.default_data_config()
  d.update(fields)
  return d


@pytest.mark.parametrize(
  "fields, shape, dtype",
  [
    (dict(source="synthetic", resolution=16, channels=3), (16, 16, 3), np.uint8),
    (dict(source="synthetic", resolution=8, channels=1, frames=3), (3, 8, 8, 1), np.uint8),
    (dict(source="synthetic_latents", resolution=8, channels=16), (8, 8, 16), np.float32),
    (
      dict(source="synthetic_latents", resolution=4, channels=4, frames=2),
      (2, 4, 4, 4),
      np.float32,
    ),
  ],
)
def test_synthetic_elements_have_the_configs_shape_and_classes(fields, shape, dtype):
  d = _data(num_classes=7, synthetic_examples=20, **fields)
  sources.validate_data_config(d)
  src = sources.open_source(d)
  assert len(src) == 20
  first = src[3]
  assert first["image"].shape == shape and first["image"].dtype == dtype
  assert [int(src[i]["label"]) for i in range(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]
  np.testing.assert_array_equal(first["image"], src[3]["image"])  # deterministic per index
  assert not np.array_equal(first["image"], src[10]["image"])  # same class, another element
  with pytest.raises(IndexError):
    src[20]


def test_synthetic_images_are_smooth_like_natural_data():
  """Most of the variance is in the coarse band, as in natural images (the pyramid's premise)."""
  src = sources.open_source(_data(source="synthetic", resolution=32, channels=1))
  x = np.stack([src[i]["image"][..., 0] for i in range(64)]).astype(np.float32)
  coarse = x.reshape(64, 8, 4, 8, 4).mean(axis=(2, 4))
  fine = x - np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  assert fine.var() < 0.2 * x.var()


def test_synthetic_source_refuses_an_empty_dataset():
  with pytest.raises(ValueError, match="data.synthetic_examples: must be an int >= 1"):
    sources.validate_data_config(_data(source="synthetic", synthetic_examples=0))


@pytest.mark.parametrize("kind", ["flux1", "taef2", "sd"])
def test_stand_in_autoencoder_has_the_kinds_latent_shape(kind):
  ae = autoencoders.stand_in(kind)
  want = {"flux1": 16, "taef2": 32, "sd": 4}[kind]
  assert (ae.latent_channels, ae.downsample) == (want, 8)
  z = ae.encode(np.zeros((1, 16, 16, 3), np.float32))
  assert z.shape == (1, 2, 2, want)
  assert ae.decode(z).shape == (1, 16, 16, 3)


def test_from_config_builds_the_stand_in():
  ae = autoencoders.from_config({"kind": "flux1", "weights": autoencoders.STAND_IN})
  assert ae.latent_channels == 16


def test_runlocal_stands_in_for_what_is_not_on_this_machine():
  c = config_file("imagenet512.py", "runlocal")
  assert c.data.source == "synthetic_latents" and c.data.path == ""
  assert (c.data.resolution, c.data.channels, c.data.num_classes) == (64, 16, 1000)
  assert c.autoencoder.weights == autoencoders.STAND_IN
  video = config_file("kinetics700.py", "runlocal")
  # 13 frames of 32x32 coarse tokens are 13,312 tokens: cut to 2 frames (2,048)
  assert video.data.frames == video.encode.data.frames == video.eval.reference.frames == 2
  assert config_file("moving_digits.py", "runlocal").data.frames == 8  # 8 x 100 tokens: kept
  full = config_file("imagenet512.py", "dfm")  # only the runlocal variant stands in
  assert full.data.source == "latents" and full.autoencoder.weights.endswith("ae.safetensors")
  local = config_file("default.py", "runlocal")  # embedded data: nothing to stand in for
  assert local.data.source == "mnist5k" and local.autoencoder.weights == ""
