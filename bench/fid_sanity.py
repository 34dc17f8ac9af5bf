"""Reproducible FID sanity figures on Fashion-MNIST and the Inception throughput of this machine.

  python bench/fid_sanity.py                     # 150 vs 150 images, blur sigma 1 and 2
  python bench/fid_sanity.py --num 2000 --blur 0.5,1,2

Needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) and the cached FID
Inception weights (`python -m dfm_jax.evaluation.weights`). Real images: `--num` random
Fashion-MNIST training images as the reference and `--num` test images, both read through
``dfm_jax.data.load_images`` (28x28 grayscale zero-padded to 32x32, as configs/fashion_mnist.py
trains on them). Compared with ``dfm_jax.evaluation.fid_features.compute_metrics`` (pytorch-fid
conventions: RGB by channel repetition, bilinear resize to 299) against the training reference:
the test images (the floor FID reaches at this sample size: both sets are real), uniform noise,
and the test images blurred with a Gaussian of each `--blur` sigma in pixels (scipy.ndimage).

The reference statistics are computed once into a temporary cache, and that extraction is timed:
the headline is Inception feature-extraction throughput in images/s (after compilation, which is
timed separately). FID is biased upwards at small sample sizes, so compare figures only at the
same `--num`. The network costs 11.0 GFLOP per 299x299 image (5.5 G multiply-adds; XLA's cost
analysis).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from scipy import ndimage

import common
from dfm_jax import data as data_lib
from dfm_jax.evaluation import fid_features

FASHION = "/usr/share/datasets/fashion-mnist"
BATCH = 50


def fashion_images(split_file: str, num: int, seed: int) -> np.ndarray:
  data = data_lib.default_data_config()
  data.update(
    source="idx",
    path=os.path.join(FASHION, split_file),
    resolution=32,
    channels=1,
    crop="pad",
    num_classes=10,
  )
  images, _ = data_lib.load_images(data, num, seed=seed)
  return images


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
  out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=150, help="images per set (multiple of 50)")
  parser.add_argument("--blur", default="1,2", help="Gaussian blur sigmas in pixels")
  parser.add_argument("--seed", type=int, default=0)
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)

  report.say(common.machine_summary())
  params = fid_features.inception_params()
  train = fashion_images("train-images-idx3-ubyte.gz", args.num, args.seed)
  test = fashion_images("t10k-images-idx3-ubyte.gz", args.num, args.seed)
  rng = np.random.default_rng(args.seed)
  fakes = {
    "Fashion-MNIST test (real)": test,
    "uniform noise": rng.integers(0, 256, test.shape, dtype=np.uint8),
  }
  for sigma in (float(s) for s in args.blur.split(",")):
    fakes[f"test, Gaussian blur sigma {sigma:g} px"] = blurred(test, sigma)

  start = time.perf_counter()
  fid_features.extract_features(np.zeros((BATCH, 32, 32, 1), np.uint8), BATCH, params)
  compile_s = time.perf_counter() - start

  rows = []
  with tempfile.TemporaryDirectory() as cache:
    # Reference statistics go to a temporary cache, so the user's cache is left as it is.
    previous = os.environ.get("DFM_JAX_CACHE")
    os.environ["DFM_JAX_CACHE"] = cache
    try:
      key = f"bench-fashion-mnist-train-32-{args.num}"
      start = time.perf_counter()
      fid_features.reference_statistics(key, train, BATCH, params)
      reference_s = time.perf_counter() - start
      for name, images in fakes.items():
        start = time.perf_counter()
        m = fid_features.compute_metrics(
          images,
          ref_key=key,
          batch_size=BATCH,
          params=params,
          kid_subset_size=min(1000, args.num // 2),
        )
        seconds = time.perf_counter() - start
        rows.append(
          [
            name,
            f"{m['fid']:.2f}",
            f"{m['kid']:.4f} +- {m['kid_std']:.4f}",
            f"{seconds:.1f}",
            f"{len(images) / seconds:.2f}",
          ]
        )
    finally:
      if previous is None:
        del os.environ["DFM_JAX_CACHE"]
      else:
        os.environ["DFM_JAX_CACHE"] = previous

  rate = args.num / reference_s
  report.table(
    f"FID / KID against {args.num} Fashion-MNIST training images (32x32 grayscale, padded), "
    f"{args.num} images per set; KID over 100 subsets of {min(1000, args.num // 2)}; s and "
    f"images/s include FID and KID",
    ["set", "FID", "KID", "s", "images/s"],
    rows,
  )
  report.say(
    f"Inception compile + first batch: {compile_s:.1f} s; reference statistics of "
    f"{args.num} images: {reference_s:.1f} s"
  )
  report.finish(f"Inception feature extraction throughput: {rate:.2f} images/s")


if __name__ == "__main__":
  main()
