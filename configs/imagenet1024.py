"""ImageNet 1024x1024: DiT-XL on 16-channel 128x128 latents, the paper's 256 -> 1024 px split.

The coarse stage is 32x32 latents (256 px) with patch 1, the fine stage 128x128 latents (two
pyramid levels finer) with patch 4: both give 1024 tokens. As the paper: p_q = (0.9, 0.1),
350k steps, sampling 30 + 10 steps with tau = 0.95. `get_config('three')` is the ablation's
3-stage 256 -> 512 -> 1024 px pyramid.

Latents come from the FLUX.1 autoencoder (`autoencoder.kind=flux1`, your `ae.safetensors`):
128 x 128 x 16 float16 values per image, about 672 GB for the 1,281,167 training images
(1.34 TB with `--flip`):

  python -m dfm_jax.encode --config=configs/imagenet1024.py --out=gs://BUCKET/in1024_latents \
      --config.encode.data.data_dir=/data/tfds \
      --config.autoencoder.weights=/data/flux1/ae.safetensors

  python -m dfm_jax.main --config=configs/imagenet1024.py --workdir=gs://BUCKET/dfm1024 \
      --config.data.path=gs://BUCKET/in1024_latents --config.distributed.initialize=True

Flow-matching twin (DiT-XL/4 on the 128x128 latents: same tokens and compute):

  python -m dfm_jax.main --config=configs/imagenet1024.py:fm --workdir=gs://BUCKET/fm1024
"""

from dfm_jax.config_defaults import apply_variants, paper_imagenet_config, parse_variants


def get_config(arg: str = "dfm"):
  variants = parse_variants(arg, ("fm", "cascade", "three", "runlocal"))
  c = paper_imagenet_config()
  c.total_steps = 350_000
  c.data.path = "gs://BUCKET/in1024_latents"  # the encode command's --out
  c.encode.data.resolution = 1024
  c.eval.reference.resolution = 1024
  c.data.resolution = 128  # the latent grid: 1024 px through an 8x autoencoder
  c.decomposition.num_stages = 2
  c.decomposition.level_gaps = (2,)
  c.model.patch_size = 1
  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.95,)
  c.eval.num_samples = 10_000
  if "three" in variants:
    c.decomposition.num_stages = 3
    c.decomposition.level_gaps = (1, 1)
    c.flow.stage_probs = (0.8, 0.1, 0.1)
    c.sampler.steps_per_stage = (30, 5, 5)
    c.sampler.thresholds = (0.9, 0.95)
  return apply_variants(c, variants)
