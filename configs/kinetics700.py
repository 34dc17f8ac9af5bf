"""Kinetics-700 512 px video, the paper's video setting as far as it is stated: DiT-XL/2 on
autoencoder latents, 2 stages, class-conditional (700 classes), FVD/frame-FID evaluation.

Stated by the paper (method notes sections 2, 4, 6, 8): 512 px clips through the CogVideoX video
autoencoder (16 channels, 8x spatial downsampling: 64x64 latents), the Laplacian pyramid on the
latents with a 32x32 and a 64x64 stage (patch 1 and 2: equal tokens), per-stage
standardisation on (`decomposition.standardize=True`), 3D RoPE with frames patchified
independently (a temporal patch of 1), the ImageNet training recipe (AdamW 0.9/0.99, lr 1e-4,
10k warm-up, EMA 0.9999, p_q = (0.9, 0.1)), 200k steps on 16 H100s. Paper numbers at cfg 1.0:
FM FID 12.6 / FDD 370.1 / FVD 304.1, DFM 9.98 / 336.7 / 260.2.

Left open by the paper, chosen here (each one a config field):
- `data.frames = 13` latent frames: CogVideoX's native 49-frame clips (4x temporal
  compression, 1 + 48 / 4 = 13 latent frames). 13 x 32 x 32 = 13,312 tokens per clip.
- `decomposition.halve_time = False`: the pyramid halves space only, so every stage has all
  frames and "frames patchified independently" holds for every stage. The re-implementation's
  3D decomposer also halves time; the `halve_time` variant switches to that (it needs an even
  frame count, so it also sets 12 latent frames; the fine stage then gets a temporal patch of 2
  and the token count becomes 6 x 32 x 32 = 6,144).
- batch 256 as for ImageNet; sampling 30 + 10 Euler steps with tau = 0.7 (the 512 px setting).

Data: `data.path` must hold precomputed video latents [N, T, 64, 64, 16] (there is no video
latent source or CogVideoX encoder in this project yet, so this config validates and sizes the
model but cannot train as shipped); evaluation decodes through `autoencoder` and compares
against `eval.reference`, a `video_folder` of Kinetics-700 clips (FVD needs
`eval.i3d_weights=i3d_pretrained_400.pt`).

  python -m dfm_jax.main --config=configs/kinetics700.py --workdir=gs://BUCKET/k700 \\
      --config.data.path=/data/k700_latents --config.distributed.initialize=True

Flow-matching twin (one stage, patch 2 on the 64x64 latents, same tokens and steps):

  python -m dfm_jax.main --config=configs/kinetics700.py:fm --workdir=gs://BUCKET/k700_fm
"""

from dfm_jax.config_defaults import apply_variants, parse_variants, paper_imagenet_config


def get_config(arg: str = "dfm"):
  variants = parse_variants(arg, ("fm", "cascade", "runlocal", "halve_time"))
  c = paper_imagenet_config()
  c.total_steps = 200_000
  c.data.source = "latents"
  c.data.path = "/data/kinetics700_512_cogvideox_latents"
  c.data.num_classes = 700
  c.data.resolution = 64  # 512 px through the 8x autoencoder
  c.data.channels = 16
  c.data.frames = 13  # latent frames (49 video frames)

  c.decomposition.kind = "laplacian"
  c.decomposition.num_stages = 2
  c.decomposition.halve_time = False
  c.decomposition.standardize = True  # per-stage unit std: on for video in the paper

  c.model.patch_size = 1  # 32x32 stage: patch 1; 64x64 stage: patch 2 (per frame)
  c.model.pos_embed = "rope"  # 3D RoPE over (frame, row, column)

  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)
  c.sampler.batch_size = 16

  c.eval.metrics = ("frame_fid", "fvd")
  c.eval.num_samples = 10_000
  c.eval.batch_size = 16
  c.eval.num_real = 10_000
  c.eval.frame_fid_frames = 4
  c.eval.i3d_weights = ""  # i3d_pretrained_400.pt
  c.eval.i3d_batch = 8
  c.eval.reference.source = "video_folder"
  c.eval.reference.path = "/data/kinetics700/val"
  c.eval.reference.resolution = 512
  c.eval.reference.channels = 3
  c.eval.reference.frames = 49
  c.eval.reference.num_classes = 700
  if "halve_time" in variants:
    c.decomposition.halve_time = True
    c.data.frames = 12
  return apply_variants(c, variants - {"halve_time"})
