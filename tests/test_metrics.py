"""FID / KID / IS against closed forms for Gaussians and hand-made classifier outputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dfm_jax.evaluation.metrics import (
  feature_statistics,
  frechet_distance,
  inception_score,
  kernel_inception_distance,
)

# ----------------------------------------------------------------------------- Frechet distance


def random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


@settings(max_examples=60, deadline=None)
@given(
  d=st.integers(1, 6),
  data=st.data(),
)
def test_fd_commuting_covariances_closed_form(d, data):
  """Same eigenvectors: FD = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2, zeros allowed."""
  floats = st.floats(-5, 5, allow_nan=False, allow_infinity=False)
  variances = st.floats(0, 10, allow_nan=False, allow_infinity=False)
  m1, m2 = (data.draw(hnp.arrays(np.float64, d, elements=floats)) for _ in range(2))
  a, b = (data.draw(hnp.arrays(np.float64, d, elements=variances)) for _ in range(2))
  q = random_rotation(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))), d)
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = frechet_distance(m1, s1, m2, s2)
  assert got == pytest.approx(expected, rel=1e-7, abs=1e-7)
  assert frechet_distance(m2, s2, m1, s1) == pytest.approx(got, rel=1e-7, abs=1e-7)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_fd_two_dimensional_non_commuting_closed_form(seed):
  """For 2x2 A with eigenvalues >= 0: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A))."""
  rng = np.random.default_rng(seed)
  f1, f2 = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
  s1, s2 = f1 @ f1.T + 0.01 * np.eye(2), f2 @ f2.T + 0.01 * np.eye(2)
  m1, m2 = rng.normal(size=2), rng.normal(size=2)
  tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_fd_matches_sqrtm_formula_on_full_rank_covariances():
  rng = np.random.default_rng(0)
  d = 24
  f1, f2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  s1, s2 = f1 @ f1.T / d + 0.1 * np.eye(d), f2 @ f2.T / d + 0.1 * np.eye(d)
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)


def test_fd_identical_singular_statistics_is_zero():
  """Fewer samples than dimensions: singular sigma, FD of a set with itself is 0."""
  features = np.random.default_rng(1).normal(size=(5, 64)) * 3.0
  mu, sigma = feature_statistics(features)
  assert np.linalg.matrix_rank(sigma) == 4
  assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
  assert frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(64.0, rel=1e-9)


def test_fd_rejects_bad_input():
  with pytest.raises(ValueError, match="shape"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="NaN"):
    frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def test_feature_statistics_match_numpy_and_converge():
  rng = np.random.default_rng(2)
  small = rng.normal(size=(50, 7)).astype(np.float32)
  mu, sigma = feature_statistics(small, chunk=8)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, small.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(small.astype(np.float64), rowvar=False), rtol=1e-10)

  m1, m2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 0.0, 1.0])
  a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
  q = random_rotation(rng, 3)
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  x = rng.multivariate_normal(m1, s1, size=200_000)
  y = rng.multivariate_normal(m2, s2, size=200_000)
  (mx, sx), (my, sy) = feature_statistics(x), feature_statistics(y)
  np.testing.assert_allclose(mx, m1, atol=0.02)
  np.testing.assert_allclose(sx, s1, atol=0.05)
  exact = frechet_distance(m1, s1, m2, s2)
  assert exact == pytest.approx(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
  assert frechet_distance(mx, sx, my, sy) == pytest.approx(exact, rel=0.02)


# ----------------------------------------------------------------------------- KID


def polynomial_kernel_expectation(mu_a, cov_a, mu_b, cov_b) -> float:
  """E[(u.v / d + 1)^3] for independent u ~ N(mu_a, cov_a), v ~ N(mu_b, cov_b)."""

  def moments(mu, cov):
    third = (
      np.einsum("i,j,k->ijk", mu, mu, mu)
      + np.einsum("i,jk->ijk", mu, cov)
      + np.einsum("j,ik->ijk", mu, cov)
      + np.einsum("k,ij->ijk", mu, cov)
    )
    return mu, cov + np.outer(mu, mu), third

  d = mu_a.shape[0]
  (a1, a2, a3), (b1, b2, b3) = moments(mu_a, cov_a), moments(mu_b, cov_b)
  e1, e2, e3 = a1 @ b1 / d, np.sum(a2 * b2) / d**2, np.sum(a3 * b3) / d**3
  return e3 + 3 * e2 + 3 * e1 + 1


def test_kid_matches_gaussian_closed_form():
  mu1, cov1 = np.array([0.5, -0.2, 0.1]), np.diag([1.0, 0.5, 2.0])
  mu2 = np.array([0.0, 0.3, 0.4])
  cov2 = np.array([[1.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 0.7]])
  exact = (
    polynomial_kernel_expectation(mu1, cov1, mu1, cov1)
    + polynomial_kernel_expectation(mu2, cov2, mu2, cov2)
    - 2 * polynomial_kernel_expectation(mu1, cov1, mu2, cov2)
  )
  rng = np.random.default_rng(1)
  x = rng.multivariate_normal(mu1, cov1, 20_000)
  y = rng.multivariate_normal(mu2, cov2, 20_000)
  mean, std = kernel_inception_distance(x, y, num_subsets=100, subset_size=1000, seed=0)
  assert mean == pytest.approx(exact, rel=0.03)
  assert 0 < std < exact
  same, _ = kernel_inception_distance(
    x, rng.multivariate_normal(mu1, cov1, 20_000), num_subsets=20, subset_size=1000
  )
  assert abs(same) < 0.02 * exact


def test_kid_subset_estimate_is_the_unbiased_mmd():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(6, 4)), rng.normal(loc=0.5, size=(6, 4))

  def k(u, v):
    return (u @ v / 4 + 1) ** 3

  m = 6
  within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  expected = within / (m * (m - 1)) - 2 * cross / m**2
  mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=10)
  assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
  repeat = kernel_inception_distance(x, y, 5, 4, seed=7)
  assert kernel_inception_distance(x, y, 5, 4, seed=7) == repeat
  with pytest.raises(ValueError):
    kernel_inception_distance(x[:1], y)


# ----------------------------------------------------------------------------- Inception Score


def test_is_uniform_predictions_is_one():
  mean, std = inception_score(np.zeros((100, 1008)), num_splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 50])
def test_is_confident_predictions_spread_over_k_classes_is_k(k):
  labels = np.tile(np.arange(k), 10 * 3)  # every split holds each class 3 times
  logits = np.full((labels.size, 1008), -1e4)
  logits[np.arange(labels.size), labels] = 0.0
  mean, std = inception_score(logits, num_splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_is_mixed_example_and_shift_invariance():
  # p(y|x) = (1, 0) and (1/2, 1/2): p(y) = (3/4, 1/4).
  p = np.array([[1.0, 0.0], [0.5, 0.5]])
  logits = np.log(np.clip(p, 1e-300, None))
  kl = (np.log(1 / 0.75) + 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) / 2
  assert inception_score(logits, num_splits=1)[0] == pytest.approx(np.exp(kl), rel=1e-12)
  z = np.random.default_rng(4).normal(size=(40, 12))
  shifted = z + np.random.default_rng(5).normal(size=(40, 1)) * 100
  np.testing.assert_allclose(inception_score(z, 4), inception_score(shifted, 4), rtol=1e-9)
  with pytest.raises(ValueError):
    inception_score(z, num_splits=41)
