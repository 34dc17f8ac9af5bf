"""Sample-quality metrics from Inception outputs, in float64 numpy.

* Frechet distance (FID when fed pool3 statistics) between Gaussians ``N(mu1, S1)``,
  ``N(mu2, S2)``: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.
* Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (Binkowski et al., 2018).
* Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` per split of the samples.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack

__all__ = [
  "feature_statistics",
  "frechet_distance",
  "kernel_inception_distance",
  "inception_score",
]


def feature_statistics(features, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``, N >= 2."""
  f = np.asarray(features)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need features of shape [N >= 2, D], got {f.shape}")
  mu = f.mean(axis=0, dtype=np.float64)
  scatter = np.zeros((f.shape[1], f.shape[1]), np.float64)
  for start in range(0, f.shape[0], chunk):
    block = f[start : start + chunk].astype(np.float64) - mu
    scatter += block.T @ block
  return mu, scatter / (f.shape[0] - 1)


def _psd_factor(s: np.ndarray) -> np.ndarray:
  """``R [D, r]`` with ``S = R R^T`` for symmetric PSD ``S`` of numerical rank r.

  Pivoted Cholesky (LAPACK ``dpstrf``) stops at the numerical rank, so the singular
  covariances of fewer samples than dimensions cost O(D^2 r) and need no diagonal offset.
  """
  c, piv, rank, info = scipy.linalg.lapack.dpstrf((s + s.T) / 2, lower=1)
  if info < 0:
    raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
  r = np.zeros((s.shape[0], rank))
  r[piv - 1] = np.tril(c)[:, :rank]
  return r


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
  """``tr((S1 S2)^(1/2))`` for PSD S1, S2, without ``sqrtm`` and without diagonal offsets.

  With factors ``S1 = R1 R1^T`` and ``S2 = R2 R2^T``, ``S1 S2`` has the nonzero eigenvalues of
  ``R1^T S2 R1 = (R1^T R2)(R1^T R2)^T``: the squared singular values of ``R1^T R2``. Full-rank
  covariances take the (faster) symmetric eigenvalue route; when either is singular, as with
  fewer samples than dimensions, the singular values are summed directly so that exact zeros
  do not turn into square roots of rounding noise.
  """
  r1, r2 = _psd_factor(s1), _psd_factor(s2)
  d = s1.shape[0]
  if r1.shape[1] == d and r2.shape[1] == d:
    m = r1.T @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())
  if min(r1.shape[1], r2.shape[1]) == 0:
    return 0.0
  return float(np.linalg.svd(r1.T @ r2, compute_uv=False).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

  Args:
    mu1, mu2: means ``[D]``.
    sigma1, sigma2: covariances ``[D, D]``.

  Returns:
    The squared Frechet (2-Wasserstein) distance as a Python float, clipped at 0 against
    rounding.
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
  if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
    raise ValueError("statistics contain NaN or infinity")
  diff = mu1 - mu2
  value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2)
  return max(float(value), 0.0)


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 between equally sized samples ``x``, ``y`` ``[m, d]``."""
  m, d = x.shape

  def kernel(a, b):
    k = a @ b.T / d + 1.0
    return k * k * k

  kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
  within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
  f1, f2, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
  """KID between feature sets ``f1 [N1, D]`` and ``f2 [N2, D]``.

  Each of ``num_subsets`` rounds draws ``m = min(subset_size, N1, N2)`` rows without replacement
  from each set and computes the unbiased polynomial-kernel MMD^2.

  Returns:
    ``(mean, std)`` of the per-subset estimates (std with ddof 0).
  """
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"need [N, D] features with equal D, got {f1.shape} and {f2.shape}")
  m = min(subset_size, f1.shape[0], f2.shape[0])
  if m < 2:
    raise ValueError("KID needs at least 2 samples in each set")
  rng = np.random.default_rng(seed)
  values = np.array(
    [
      _polynomial_mmd2(
        f1[rng.choice(f1.shape[0], m, replace=False)], f2[rng.choice(f2.shape[0], m, replace=False)]
      )
      for _ in range(num_subsets)
    ]
  )
  return float(values.mean()), float(values.std())


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score of classifier logits ``[N, C]``.

  Samples are cut into ``num_splits`` contiguous splits (``np.array_split``); each split scores
  ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``.

  Returns:
    ``(mean, std)`` over splits (std with ddof 0).
  """
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or z.shape[0] < num_splits or num_splits < 1:
    raise ValueError(f"need logits [N >= num_splits, C], got {z.shape} with {num_splits} splits")
  z = z - z.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, num_splits):
    p = np.exp(part)
    with np.errstate(divide="ignore"):
      log_marginal = np.log(p.mean(axis=0))
    # 0 * log 0 terms are 0; where p underflows to 0 the product is 0 as well.
    kl = np.sum(p * (part - np.where(p > 0, log_marginal, 0.0)), axis=1)
    scores.append(np.exp(kl.mean()))
  scores = np.asarray(scores)
  return float(scores.mean()), float(scores.std())
