"""Latent-space DFM on a CPU: MNIST digits (64x64 RGB) through the real TAEF2 autoencoder.

The paper trains in an autoencoder's latent space; this is the same path at CPU size. TAEF2 (the
FLUX.2 latent space: 32 channels, 8x down; its MIT weights ship inside the package, see
`dfm_jax/autoencoders/weights/taef2`) turns each 64x64 digit into an 8x8x32 latent; a 2-stage pyramid on the
latents (4x4 with patch 1, 8x8 with patch 2: 16 tokens) trains a class-conditional DFM, and
samples are decoded back to pixels for the grids, `--mode=sample` and `--mode=eval` (FID in pixel
space against the same 64x64 digits).

1. Encode the 5,000 digits into latent shards (a few minutes on 2 cores):

  python -m dfm_jax.encode --config=configs/latent_demo.py --out=workdirs/latent_demo_latents

2. Train, then sample (decoded PNG grid, and an .npz with latents and images):

  python -m dfm_jax.main --config=configs/latent_demo.py --workdir=workdirs/latent_demo
  python -m dfm_jax.main --config=configs/latent_demo.py --workdir=workdirs/latent_demo \
      --mode=sample

Flow-matching twin (one 8x8 stage with patch 2: the same 16 tokens and sampling steps):

  python -m dfm_jax.main --config=configs/latent_demo.py:fm --workdir=workdirs/latent_demo_fm
"""

import os

from dfm_jax.config_defaults import apply_variants, base_config, parse_variants
from dfm_jax.data import default_data_config


def pixel_digits():
  """The pixels that are encoded and that evaluation compares against: MNIST-5k, 64x64 RGB."""
  d = default_data_config()
  d.source = "mnist5k"
  d.resolution = 64
  d.channels = 3
  d.crop = "center"  # bicubic 28 -> 64
  d.num_classes = 10
  return d


def get_config(arg: str = "dfm"):
  variants = parse_variants(arg, ("fm", "runlocal"))
  c = base_config()
  c.total_steps = 3000
  c.batch_size = 64
  c.log_every = 100
  c.checkpoint_every = 1000
  c.sample_every = 1000

  c.encode = {"data": pixel_digits()}
  c.autoencoder.kind = "taef2"
  c.autoencoder.weights = ""  # the TAEF2 weights shipped with the package
  c.autoencoder.batch_size = 50

  c.data.source = "latents"
  c.data.path = os.path.join("workdirs", "latent_demo_latents")
  c.data.resolution = 8  # 64 px / 8
  c.data.channels = 32
  c.data.num_classes = 10

  c.decomposition.kind = "laplacian"
  c.decomposition.num_stages = 2

  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.patch_size = 1  # 4x4 stage -> 16 tokens; the 8x8 stage uses 2x2 patches

  c.flow.stage_probs = (0.9, 0.1)

  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.995

  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)
  c.sampler.cfg_scale = 3.0  # the paper's value for qualitative samples
  c.sampler.num_samples = 100
  c.sampler.batch_size = 100

  c.eval.num_samples = 1000
  c.eval.num_real = 1000
  c.eval.reference = pixel_digits()
  c.eval.metrics = ("fid", "kid")
  return apply_variants(c, variants)
