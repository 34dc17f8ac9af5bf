"""ImageNet 512x512, the paper's main setting: DiT-XL/2 on 16-channel latents (64x64), 2 stages.

The pyramid is built on latents of a 16-channel, 8x-downsampling autoencoder: a 32x32 stage with
patch 1 and a 64x64 stage with patch 2, so both give 1024 tokens, as a DiT-XL/2 on 64x64 latents.
Settings from the paper: p_q = (0.9, 0.1), logit-normal locations 0 (main) and 1.5 (earlier
stages), AdamW (0.9, 0.99), weight decay 0.01, lr 1e-4 with 10k warm-up, clipping 1.0,
EMA 0.9999, batch 256, 500k steps; sampling 30 + 10 Euler steps with tau = 0.7.

Latents come from the FLUX.1 autoencoder (`autoencoder.kind=flux1`, your `ae.safetensors`).
Encode the TFDS `imagenet2012` train split (prepared under `data_dir`) once into ArrayRecord
shards; with `--flip` (mirrored copies, as the paper's augmentation) the 1,281,167 images take
2 x 64 x 64 x 16 float16 values each: about 336 GB (168 GB without flips):

  python -m dfm_jax.encode --config=configs/imagenet512.py --out=gs://BUCKET/in512_latents \
      --flip --config.encode.data.data_dir=/data/tfds \
      --config.autoencoder.weights=/data/flux1/ae.safetensors

Train on a TPU v4-32 pod slice (every host reads the shards from gs://):

  python -m dfm_jax.main --config=configs/imagenet512.py --workdir=gs://BUCKET/dfm512 \
      --config.data.path=gs://BUCKET/in512_latents --config.distributed.initialize=True

On a v5e-256 slice (16 GiB chips) the data-parallel state does not fit; a 128-way FSDP axis
does, and 256 samples per sampling batch split over the chips (docs/compile_check.md):

  ... --config.mesh.shape="(2,128,1)" --config.sampler.batch_size=256

Flow-matching twin (DiT-XL/2 on the 64x64 latents, same compute):

  python -m dfm_jax.main --config=configs/imagenet512.py:fm --workdir=gs://BUCKET/fm512
"""

from dfm_jax.config_defaults import apply_variants, parse_variants, paper_imagenet_config


def get_config(arg: str = "dfm"):
  variants = parse_variants(arg, ("fm", "runlocal"))
  c = paper_imagenet_config()
  c.total_steps = 500_000
  c.data.path = "gs://BUCKET/in512_latents"  # the encode command's --out
  c.encode.data.resolution = 512
  c.eval.reference.resolution = 512
  c.data.resolution = 64  # the latent grid: 512 px through an 8x autoencoder
  c.decomposition.num_stages = 2
  c.model.patch_size = 1  # 32x32 stage: patch 1; 64x64 stage: patch 2
  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)
  c.eval.num_samples = 50_000
  return apply_variants(c, variants)
