"""Latent video: `encode` codes moving-digit clips frame by frame through an image autoencoder
(or whole, through a video autoencoder), the `latents` source serves them as [T, h, w, c]
clips with the config checks on data.frames, and `decode_batched` turns them back into clips."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax import autoencoders, config_defaults, encode, experiment
from dfm_jax import data as D
from dfm_jax.data import latent_shards as LS
from dfm_jax.data import moving_digits

CLIPS, FRAMES, RES = 6, 4, 32


def digits_config(**data):
  """Moving digits: 6 clips of 4 frames at 32 px, converted to RGB for the autoencoder."""
  c = config_defaults.base_config()
  c.data.update(
    dict(source="moving_digits", frames=FRAMES, resolution=RES, channels=3, num_videos=CLIPS)
  )
  c.data.update(data)
  c.autoencoder.batch_size = 8  # frames per call: 2 clips, rounded up to the 8 test devices
  return c


def reference_clips() -> tuple[np.ndarray, np.ndarray]:
  """The clips in [-1, 1], float32 [6, 4, 32, 32, 3], and labels [6], straight from the
  procedural generator (grey repeated to RGB)."""
  videos = moving_digits.MovingDigits(CLIPS, FRAMES, RES, num_digits=1, seed=0, split="train")
  clips = np.stack([videos[i]["video"] for i in range(CLIPS)]).repeat(3, axis=-1)
  labels = np.array([videos[i]["label"] for i in range(CLIPS)])
  return clips.astype(np.float32) / 127.5 - 1, labels


@pytest.fixture(scope="module")
def taesd():
  return autoencoders.build("taesd", None)  # random weights: 4 channels, 8x down


@pytest.fixture(scope="module")
def encoded(taesd, tmp_path_factory):
  """The 6 clips and their mirrors encoded frame by frame with TAESD: (folder, metadata)."""
  out = str(tmp_path_factory.mktemp("video") / "latents")
  meta = encode.encode_dataset(digits_config(), out, flip=True, shard_size=5, autoencoder=taesd)
  return out, meta


def latent_config(path, **data):
  c = D.default_data_config()
  c.update(dict(source="latents", path=path, resolution=4, channels=4, frames=FRAMES))
  c.update(data)
  return c


def test_clips_are_encoded_frame_by_frame(encoded, taesd):
  out, meta = encoded
  assert meta["latent_shape"] == [FRAMES, 4, 4, 4] and meta["count"] == 2 * CLIPS
  assert meta["source"]["frames"] == FRAMES and "[T, h, w, c]" in meta["record_format"]
  stored, labels = LS.LatentShards(out).arrays()
  assert stored.shape == (2 * CLIPS, FRAMES, 4, 4, 4)
  clips, want_labels = reference_clips()
  for i in range(CLIPS):
    for t in range(FRAMES):  # every frame on its own; odd records hold the mirrored clip
      frame = clips[i, t : t + 1]
      for record, pixels in ((2 * i, frame), (2 * i + 1, frame[:, :, ::-1])):
        np.testing.assert_allclose(
          stored[record, t], np.asarray(taesd.encode(pixels))[0], atol=2e-3, rtol=1e-3
        )
  np.testing.assert_array_equal(labels, np.repeat(want_labels, 2))
  all64 = stored.astype(np.float64)
  np.testing.assert_allclose(meta["channel_mean"], all64.mean(axis=(0, 1, 2, 3)), rtol=1e-12)
  np.testing.assert_allclose(meta["channel_std"], all64.std(axis=(0, 1, 2, 3)), rtol=1e-12)
  with open(os.path.join(out, LS.METADATA)) as f:
    assert json.load(f) == meta


def test_grayscale_clips_must_be_converted_to_rgb(tmp_path, taesd):
  with pytest.raises(ValueError, match=r"data\.channels=1: .* set data\.channels=3"):
    encode.encode_dataset(digits_config(channels=1), str(tmp_path / "o"), autoencoder=taesd)


def test_latents_source_serves_clips(encoded):
  out, _ = encoded
  stored, labels = LS.LatentShards(out).arrays()
  c = latent_config(out)
  source = D.open_source(c)
  element = source[3]
  assert element["image"].shape == (FRAMES, 4, 4, 4) and element["image"].dtype == np.float32
  np.testing.assert_array_equal(element["image"], stored[3].astype(np.float32))
  assert element["label"] == labels[3]
  batch = next(D.make_train_iterator(c, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, FRAMES, 4, 4, 4) and batch["label"].shape == (4,)
  stored32 = stored.astype(np.float32)
  for clip, label in zip(batch["image"], batch["label"]):
    (k,) = [k for k in range(len(stored32)) if np.array_equal(stored32[k], clip)]
    assert label == labels[k]


@pytest.mark.parametrize(
  "frames,message",
  [
    (3, r"are clips of 4 latent frames, but data\.frames=3; set data\.frames=4"),
    (0, r"are clips of 4 frames .* but data\.frames=0 \(images\); set data\.frames=4"),
  ],
)
def test_frames_mismatch_is_one_clear_error(encoded, frames, message):
  out, _ = encoded
  c = config_defaults.base_config()
  c.data = latent_config(out, frames=frames)
  with pytest.raises(ValueError, match=rf"data\.path: latent shards in '{out}' {message}"):
    D.validate_data_config(c.data)
  with pytest.raises(ValueError) as err:
    experiment.from_config(c)
  lines = [line for line in str(err.value).splitlines() if "data.frames" in line]
  assert len(lines) == 1 and out in lines[0], str(err.value)


def test_image_latents_refuse_a_video_config_and_npz_clips_load(tmp_path):
  images = str(tmp_path / "images.npz")
  np.savez(images, latents=np.zeros((3, 4, 4, 4), np.float32), labels=np.zeros(3, np.int32))
  c = config_defaults.base_config()
  c.data = latent_config(images)
  with pytest.raises(ValueError, match=r"data\.path: latents in .*images\.npz.* are images .*"):
    experiment.from_config(c)

  clips = str(tmp_path / "clips.npz")
  latents = np.random.default_rng(0).normal(size=(3, FRAMES, 4, 4, 4)).astype(np.float32)
  np.savez(clips, latents=latents, labels=np.arange(3))
  c.data = latent_config(clips)
  assert experiment.from_config(c).sample_shape == (FRAMES, 4, 4, 4)
  np.testing.assert_array_equal(D.open_source(c.data)[2]["image"], latents[2])
  c.data.frames = 2
  with pytest.raises(ValueError, match=r"clips of 4 latent frames, but data\.frames=2"):
    experiment.from_config(c)


def test_decode_batched_decodes_clips_frame_by_frame(encoded, taesd):
  stored, _ = LS.LatentShards(encoded[0]).arrays()
  z = stored[:3].astype(np.float32)
  clips = autoencoders.decode_batched(taesd, z, batch_size=8)  # 2 clips per call
  assert clips.shape == (3, FRAMES, RES, RES, 3)
  for i in range(3):
    np.testing.assert_allclose(clips[i], np.asarray(taesd.decode(z[i])), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A video autoencoder codes whole clips (here: averaging frame pairs, so T' = T / 2).


class PairAE(nnx.Module):
  """Stand-in video autoencoder: the mean of each frame pair, 8x8 average pooling and a fixed
  3 -> 4 channel projection; decoding repeats each latent frame twice."""

  name, latent_channels, downsample, scale, shift = "pairs", 4, 8, 1.0, 0.0

  def __init__(self):
    self.w = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32))

  def encode_video_traced(self, clips):
    """clips [B, T, H, W, 3] -> [B, T/2, H/8, W/8, 4]."""
    b, t, h, w, _ = clips.shape
    x = clips.reshape(b, t // 2, 2, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4, 6))
    return x @ self.w[...]

  def decode_video_traced(self, latents):
    """[B, T', h, w, 4] -> [B, 2T', 8h, 8w, 3]: the first 3 channels, repeated."""
    x = jnp.repeat(latents[..., :3], 2, axis=1)
    return jnp.repeat(jnp.repeat(x, 8, axis=2), 8, axis=3)


def test_a_video_autoencoder_encodes_whole_clips(tmp_path):
  ae = PairAE()
  out = str(tmp_path / "pairs")
  meta = encode.encode_dataset(digits_config(), out, shard_size=4, autoencoder=ae)
  assert meta["latent_shape"] == [FRAMES // 2, 4, 4, 4] and meta["count"] == CLIPS
  stored, _ = LS.LatentShards(out).arrays()
  clips, _ = reference_clips()
  w = np.asarray(ae.w[...], np.float64)
  for i in range(CLIPS):
    for t in range(FRAMES // 2):
      pair = clips[i, 2 * t : 2 * t + 2].astype(np.float64)
      pooled = np.stack(
        [
          [pair[:, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8].mean(axis=(0, 1, 2)) for x in range(4)]
          for y in range(4)
        ]
      )
      np.testing.assert_allclose(stored[i, t], pooled @ w, atol=2e-3, rtol=1e-3)

  decoded = autoencoders.decode_batched(ae, stored.astype(np.float32), batch_size=4)
  assert decoded.shape == (CLIPS, FRAMES, RES, RES, 3)
  np.testing.assert_array_equal(
    decoded[:, 3, 8:16, 0:8],
    np.broadcast_to(stored[:, 1, 1:2, 0:1, :3].astype(np.float32), (CLIPS, 8, 8, 3)),
  )
