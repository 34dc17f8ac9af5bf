"""Autoencoder cost against training: encode throughput vs the latent train step's consumption,
and the decode cost per sample, measured side by side.

  python bench/latent_codec.py                       # TAEF2 on 64x64 digits, configs/latent_demo.py
  python bench/latent_codec.py --resolution 256 --batch 8 --rounds 3

The encoder and decoder are the real TAEF2 weights (shipped in `dfm_jax/autoencoders/weights/taef2`), jit-compiled,
on MNIST-5k digits resized to `--resolution` RGB; the train step is `configs/latent_demo.py`'s
(batch 64 of 8x8x32 latents at 64 px) through `dfm_jax.train.compile_step`. Rounds alternate
the three programs. "encode / train" is the ratio of images per second: how many training runs
one encoder process could feed if latents were encoded on the fly (above 1: encoding once up
front costs less than one epoch of training). Decode cost is what every sample grid, sample and
evaluation pays per sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import common
from dfm_jax import autoencoders
from dfm_jax.data import load_mnist5k


def digits(num: int, resolution: int) -> np.ndarray:
  images, _ = load_mnist5k()
  out = [
    np.asarray(
      Image.fromarray(im[..., 0]).resize((resolution, resolution), Image.Resampling.BICUBIC)
    )
    for im in images[:num]
  ]
  rgb = np.repeat(np.stack(out)[..., None], 3, axis=-1)
  return rgb.astype(np.float32) / 127.5 - 1.0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5)
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)
  report.say(common.machine_summary())
  sys.path.insert(0, str(common.REPO / "configs"))
  import latent_demo  # pylint: disable=g-import-not-at-top

  ae = autoencoders.build("taef2", autoencoders.shipped_weights("taef2"))
  images = jnp.asarray(digits(args.batch, args.resolution))
  latents = jax.block_until_ready(ae.encode(images))
  config = latent_demo.get_config()
  with tempfile.TemporaryDirectory() as workdir:
    config = common.latent_config(config, workdir, config.data.resolution, config.data.channels)
    step = common.build_train_steps({"train": config}, devices=jax.devices()[:1])["train"]
  fns = {
    "encode": common.blocking(lambda: ae.encode(images)),
    "decode": common.blocking(lambda: ae.decode(latents)),
    "train": step,
  }
  times = common.interleaved_times(fns, args.rounds)
  enc = [args.batch / t for t in times["encode"]]
  train = [config.batch_size / t for t in times["train"]]
  ratio, lo, hi = common.paired_ratio(enc, train)
  rows = [
    ["encode", f"{args.resolution}px", args.batch, f"{common.median(enc):.1f}", ""],
    [
      "decode",
      f"{args.resolution}px",
      args.batch,
      f"{args.batch / common.median(times['decode']):.1f}",
      f"{1e3 * common.median(times['decode']) / args.batch:.1f}",
    ],
    ["train step (latent_demo)", "8x8x32", config.batch_size, f"{common.median(train):.1f}", ""],
  ]
  report.table(
    "TAEF2 against the latent train step",
    ["program", "input", "batch", "images/s", "ms per sample"],
    rows,
  )
  report.finish(
    f"encode / train images per second: {ratio:.2f} (IQR {lo:.2f}-{hi:.2f}); decode "
    f"{1e3 * common.median(times['decode']) / args.batch:.1f} ms per sample"
  )


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
