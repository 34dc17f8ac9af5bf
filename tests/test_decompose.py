"""Decompositions: perfect reconstruction, stage shapes, the paper's pyramid, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings, strategies as st

from dfm_jax import decompose


def _rand(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("kind", decompose.KINDS)
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_perfect_reconstruction_images(kind, num_stages):
  x = _rand((2, 32, 48, 3))
  dec = decompose.build(kind, num_stages)
  stages = dec.split(x)
  assert len(stages) == num_stages
  assert tuple(s.shape for s in stages) == dec.stage_shapes(x.shape)
  np.testing.assert_allclose(dec.merge(stages), x, atol=2e-6)


@pytest.mark.parametrize("kind", decompose.KINDS)
@pytest.mark.parametrize("halve_time", [False, True])
def test_perfect_reconstruction_videos(kind, halve_time):
  x = _rand((2, 8, 16, 16, 2), seed=1)
  dec = decompose.build(kind, 3, halve_time=halve_time)
  stages = dec.split(x)
  assert tuple(s.shape for s in stages) == dec.stage_shapes(x.shape)
  np.testing.assert_allclose(dec.merge(stages), x, atol=2e-6)
  time_sizes = [s.shape[1] for s in stages]
  if halve_time and kind != "dwt":
    assert time_sizes == [2, 4, 8]
  elif not halve_time:
    assert time_sizes == [8, 8, 8]


@settings(max_examples=8, deadline=None)
@given(
  kind=st.sampled_from(decompose.KINDS),
  num_stages=st.integers(1, 4),
  h_units=st.integers(1, 3),
  w_units=st.integers(1, 3),
  channels=st.integers(1, 4),
  seed=st.integers(0, 1000),
)
def test_perfect_reconstruction_property(kind, num_stages, h_units, w_units, channels, seed):
  factor = 2 ** (num_stages - 1)
  shape = (1, h_units * factor, w_units * factor, channels)
  x = _rand(shape, seed) * 3.0 + 1.0
  dec = decompose.build(kind, num_stages)
  np.testing.assert_allclose(dec.merge(dec.split(x)), x, atol=1e-5)


def test_laplacian_matches_paper_formula_with_reference_resize():
  """X_1 = down(X), X_2 = X - up(down(X)) with bilinear resizes from jax.image."""
  x = _rand((2, 16, 16, 3))
  down = jax.image.resize(x, (2, 8, 8, 3), "bilinear", antialias=False)
  up = jax.image.resize(down, (2, 16, 16, 3), "bilinear")
  s1, s2 = decompose.build("laplacian", 2).split(x)
  np.testing.assert_allclose(s1, down, atol=1e-6)
  np.testing.assert_allclose(s2, x - up, atol=1e-6)


def test_dct_stages_are_frequency_bands():
  x = np.asarray(_rand((1, 16, 16, 1)))
  s1, s2 = decompose.build("dct", 2).split(jnp.asarray(x))
  coeffs = scipy.fft.dctn(x, axes=(1, 2), norm="ortho")
  low = np.zeros_like(coeffs)
  low[:, :8, :8] = coeffs[:, :8, :8]
  lowpass = scipy.fft.idctn(low, axes=(1, 2), norm="ortho")
  preview = decompose.build("dct", 2).preview((s1, s2), 1)
  np.testing.assert_allclose(preview, lowpass, atol=1e-5)
  band = scipy.fft.dctn(np.asarray(s2), axes=(1, 2), norm="ortho")
  np.testing.assert_allclose(band[:, :8, :8], 0.0, atol=1e-5)
  # The coarse stage keeps the mean of the image.
  np.testing.assert_allclose(np.asarray(s1).mean(), x.mean(), atol=1e-6)


def test_haar_against_explicit_2x2_blocks():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) ** 1.5
  s1, s2 = decompose.build("dwt", 2).split(jnp.asarray(x))
  blocks = x.reshape(1, 2, 2, 2, 2, 1).transpose(0, 1, 3, 2, 4, 5)  # [b, i, j, di, dj, c]
  np.testing.assert_allclose(s1[..., 0], blocks.mean(axis=(3, 4))[..., 0], rtol=1e-6)
  assert s2.shape == (1, 2, 2, 3)
  # Detail bands of a constant image vanish.
  _, d = decompose.build("dwt", 2).split(jnp.ones((1, 4, 4, 1)))
  np.testing.assert_allclose(d, 0.0)


@pytest.mark.parametrize("kind", decompose.KINDS)
def test_previews(kind):
  x = _rand((1, 16, 16, 3))
  dec = decompose.build(kind, 3)
  stages = dec.split(x)
  np.testing.assert_allclose(dec.preview(stages, 3), x, atol=2e-6)
  p1 = dec.preview(stages, 1)
  assert p1.shape == x.shape
  manual = dec.merge([stages[0], jnp.zeros_like(stages[1]), jnp.zeros_like(stages[2])])
  np.testing.assert_allclose(p1, manual, atol=1e-6)
  # The first preview is smooth: every 4x4 block of the pyramid's coarse stage.
  if kind == "dwt":
    np.testing.assert_allclose(p1[:, ::4, ::4], p1[:, 1::4, 1::4], atol=1e-6)


def test_standardisation_round_trip_and_unit_std():
  key = jax.random.key(3)
  batches = [jax.random.normal(k, (8, 16, 16, 1)) * 5 + 2 for k in jax.random.split(key, 4)]
  dec = decompose.build("laplacian", 3)
  stats = decompose.estimate_stats(dec, batches)
  std_dec = dec.with_stats(stats)
  stages = std_dec.split(jnp.concatenate(batches))
  for s in stages:
    assert abs(float(s.std()) - 1.0) < 1e-3
    assert abs(float(s.mean())) < 1e-3
  x = batches[0]
  np.testing.assert_allclose(std_dec.merge(std_dec.split(x)), x, atol=1e-4)
  assert decompose.StageStats.from_dict(stats.to_dict()) == stats


def test_jit_and_vmap():
  dec = decompose.build("laplacian", 3)
  x = _rand((4, 2, 16, 16, 1))  # vmap over a leading axis of image batches
  split = jax.jit(jax.vmap(dec.split))
  stages = split(x)
  assert stages[0].shape == (4, 2, 4, 4, 1)
  np.testing.assert_allclose(jax.vmap(dec.merge)(stages), x, atol=2e-6)


def test_unsplittable_shape_names_shape_and_nearest_sizes():
  dec = decompose.build("laplacian", 3)
  with pytest.raises(ValueError, match=r"\(1, 30, 30, 3\).*3 stages.*28, 32"):
    dec.split(jnp.zeros((1, 30, 30, 3)))
  with pytest.raises(ValueError, match="patch size 4.*nearest sizes that work: 16, 32"):
    dec.check_shape((1, 24, 32, 3), min_stage_size=4)


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown decomposition 'fourier'"):
    decompose.build("fourier", 2)
  with pytest.raises(ValueError, match="num_stages"):
    decompose.build("laplacian", 0)
  with pytest.raises(ValueError, match="rank 3"):
    decompose.build("laplacian", 2).split(jnp.zeros((4, 4, 4)))
