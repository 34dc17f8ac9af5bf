"""Kinetics-700 512 px video, the paper's video setting as far as it is stated: DiT-XL/2 on
autoencoder latents, 2 stages, class-conditional (700 classes), FVD/frame-FID evaluation.

Stated by the paper (arXiv 2506.19839): 512 px clips through the CogVideoX video
autoencoder (16 channels, 8x spatial downsampling: 64x64 latents), the Laplacian pyramid on the
latents with a 32x32 and a 64x64 stage (patch 1 and 2: equal tokens), per-stage
standardisation on (`decomposition.standardize=True`), 3D RoPE with frames patchified
independently (a temporal patch of 1), the ImageNet training recipe (AdamW 0.9/0.99, lr 1e-4,
10k warm-up, EMA 0.9999, p_q = (0.9, 0.1)), 200k steps on 16 H100s. Paper numbers at cfg 1.0:
FM FID 12.6 / FDD 370.1 / FVD 304.1, DFM 9.98 / 336.7 / 260.2.

Differs from the paper: no video autoencoder ships here yet (see `dfm_jax/autoencoders` for
the interface one would implement), so clips are encoded frame by frame through the FLUX.1
image autoencoder (`autoencoder.kind=flux1`, your `ae.safetensors`): 16 channels and 8x spatial
downsampling as CogVideoX, but no temporal compression, so every video frame gives one latent
frame. The paper's numbers are therefore not expected here.

Left open by the paper, chosen here (each one a config field):
- `data.frames = 13` frames taken every 4th source frame (`encode.data.frame_stride = 4`): a
  clip spans 49 source frames as CogVideoX's native clips, and 13 latent frames as CogVideoX
  makes of them (1 + 48 / 4), so the model size is the paper's: 13 x 32 x 32 = 13,312 tokens per
  clip. The decoded samples are 13-frame clips at a quarter of the source frame rate.
- `decomposition.halve_time = False`: the pyramid halves space only, so every stage has all
  frames and "frames patchified independently" holds for every stage. The re-implementation's
  3D decomposer also halves time; the `halve_time` variant switches to that (it needs an even
  frame count, so it encodes 12 frames; the fine stage then gets a temporal patch of 2 and the
  token count becomes 6 x 32 x 32 = 6,144).
- batch 256 as for ImageNet; sampling 30 + 10 Euler steps with tau = 0.7 (the 512 px setting).

Data: encode a `video_folder` of Kinetics-700 clips (one subfolder per class, PyAV; `encode.data`)
once into latent shards: every file is cut into non-overlapping 49-frame clips, each stored as
13 x 64 x 64 x 16 float16 values (1.7 MB); files that cannot be decoded are skipped
(`skip_corrupt`):

  python -m dfm_jax.encode --config=configs/kinetics700.py --out=gs://BUCKET/k700_latents \
      --config.encode.data.path=/data/kinetics700/train \
      --config.autoencoder.weights=/data/flux1/ae.safetensors

then train on the shards (`data.path`: the encode command's --out):

  python -m dfm_jax.main --config=configs/kinetics700.py --workdir=gs://BUCKET/k700 \
      --config.data.path=gs://BUCKET/k700_latents --config.distributed.initialize=True

Evaluation decodes the samples frame by frame through `autoencoder` and compares them against
`eval.reference`, the validation clips taken the same way (13 frames every 4th source frame);
FVD (`eval.i3d_weights=i3d_pretrained_400.pt`) repeats frames to reach I3D's 16, so its values
compare only among runs of this setting.

Flow-matching twin (one stage, patch 2 on the 64x64 latents, same tokens and steps):

  python -m dfm_jax.main --config=configs/kinetics700.py:fm --workdir=gs://BUCKET/k700_fm
"""

import ml_collections

from dfm_jax.config_defaults import apply_variants, parse_variants, paper_imagenet_config
from dfm_jax.data import default_data_config


def kinetics_clips(path: str, frames: int):
  """The pixel clips encoded (train) and evaluated against (val): 512 px, `frames` frames
  every 4th source frame."""
  d = default_data_config()
  d.source = "video_folder"
  d.path = path
  d.resolution = 512
  d.channels = 3
  d.frames = frames
  d.frame_stride = 4
  d.num_classes = 700
  d.skip_corrupt = True  # Kinetics downloads hold some undecodable files
  d.num_workers = 8
  return d


def get_config(arg: str = "dfm"):
  variants = parse_variants(arg, ("fm", "runlocal", "halve_time"))
  frames = 12 if "halve_time" in variants else 13
  c = paper_imagenet_config()  # autoencoder: FLUX.1, 16 channels, coding frame by frame
  c.total_steps = 200_000
  c.encode = ml_collections.ConfigDict({"data": kinetics_clips("/data/kinetics700/train", frames)})
  c.data.path = "gs://BUCKET/k700_latents"  # the encode command's --out
  c.data.num_classes = 700
  c.data.resolution = 64  # 512 px through the 8x autoencoder
  c.data.channels = 16
  c.data.frames = frames  # latent frames = video frames (no temporal compression)

  c.decomposition.kind = "laplacian"
  c.decomposition.num_stages = 2
  c.decomposition.halve_time = "halve_time" in variants
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
  c.eval.reference = kinetics_clips("/data/kinetics700/val", frames)
  return apply_variants(c, variants - {"halve_time"})
