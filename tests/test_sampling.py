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


def test_kept_samples_round_trip_and_bad_files_name_the_setting(tmp_path):
  from etils import epath

  from dfm_jax.evaluation import evaluate

  config = tiny_config(sampler__cfg_scale=1.5)
  pictures = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(5)
  path = epath.Path(tmp_path) / "kept.samples.npz"
  evaluate.save_samples(path, pictures, labels, 12, 3.5, config)
  got = evaluate.load_samples(path)
  np.testing.assert_array_equal(got["pictures"], pictures)
  np.testing.assert_array_equal(got["labels"], labels)
  assert got["step"] == 12 and got["sample_seconds"] == 3.5
  assert got["sampler"]["cfg_scale"] == 1.5

  with pytest.raises(FileNotFoundError, match="eval.samples_from"):
    evaluate.load_samples(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="eval.samples_from: .* not a readable"):
    evaluate.load_samples(tmp_path / "junk.npz")
  np.savez(tmp_path / "other.npz", images=pictures)
  with pytest.raises(ValueError, match="lacks"):
    evaluate.load_samples(tmp_path / "other.npz")


def test_a_batch_that_cannot_be_split_is_warned_about(caplog):
  """On 8 devices a sampling batch of 6 runs unsplit on every device; the user is told so, and a
  batch of 8 (split 1 per device) is not flagged. Both give every requested sample."""
  import jax  # pylint: disable=g-import-not-at-top

  from dfm_jax import run as run_lib, sampling  # pylint: disable=g-import-not-at-top
  from tests.train_utils import tiny_config  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8
  run = run_lib.setup(tiny_config(), None, check_data=False)
  ema = run.exp.method.sampling_state(run_lib.init_state(run))
  for batch in (6, 8):
    caplog.clear()
    with caplog.at_level("WARNING"):
      images, labels = sampling.sample_images(run, ema, num=8, batch_size=batch, seed=0)
    assert images.shape[0] == labels.shape[0] == 8
    flagged = [r for r in caplog.records if "does not divide over the 8 batch devices" in r.message]
    assert len(flagged) == (1 if batch == 6 else 0)
