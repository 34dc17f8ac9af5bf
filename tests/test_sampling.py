"""The sampling path's pieces that need no model: latent pictures without an autoencoder, grid
layout, and the check that a sampling config matches the run it restores."""

import json

import numpy as np
import pytest

from dfm_jax import sampling
from tests.train_utils import tiny_config


def test_latents_without_an_autoencoder_show_a_channel_projection():
  config = tiny_config(data__source="latents", data__channels=16, data__resolution=8)
  assert not config.autoencoder.kind
  latents = np.random.default_rng(0).normal(size=(3, 8, 8, 16)).astype(np.float32)
  latents[1] *= 100.0  # per-sample stretching: the scale of one sample does not matter
  pictures = sampling.to_display(latents, config)
  assert pictures.shape == (3, 8, 8, 3) and pictures.dtype == np.uint8
  np.testing.assert_array_equal(pictures[0], sampling.channel_projection(latents[:1])[0])
  np.testing.assert_array_equal(pictures[1], sampling.channel_projection(latents[1:2] / 100)[0])
  for p in pictures:  # 1st..99th percentile onto the full range
    assert p.min() == 0 and p.max() == 255
  one = sampling.channel_projection(latents[..., :1])
  assert one.shape == (3, 8, 8, 1)


def test_pixels_are_quantised_and_grids_have_one_column_per_class():
  config = tiny_config()
  pictures = sampling.to_display(np.array([[[[-1.0]], [[1.0]]]]), config)
  np.testing.assert_array_equal(pictures.ravel(), [0, 255])
  assert sampling.grid_columns(1000, 10) == 10 and sampling.grid_columns(1000, 1000) == 10


def test_a_config_that_does_not_match_the_run_is_named(tmp_path):
  config = tiny_config()
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), default=str))
  sampling.check_against_saved_config(config, str(tmp_path))  # the same: fine
  other = tiny_config(sampler__cfg_scale=2.0, eval__num_samples=5, data__path="/elsewhere")
  sampling.check_against_saved_config(other, str(tmp_path))  # sampling settings may differ
  wrong = tiny_config(model__hidden_size=64, decomposition__num_stages=2)
  with pytest.raises(
    ValueError,
    match=r"model.hidden_size: trained 32, given 64.*"
    r"decomposition.num_stages: trained 3, given 2",
  ):
    sampling.check_against_saved_config(wrong, str(tmp_path))
  sampling.check_against_saved_config(wrong, str(tmp_path / "no_run_here"))
