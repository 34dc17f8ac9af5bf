"""The video command lines as a user runs them: configs/moving_digits.py:runlocal trains a few
steps (periodic GIF grid and stage previews), then --mode=sample writes the GIF grid, the PNG
contact sheet, the MP4 (where PyAV has an encoder) and the .npz of [N, T, H, W, C] clips, and
--mode=eval scores a handful of clips with the video metrics. The latent video path: encode the
clips frame by frame with TAEF2, train on the latent clips, sample decoded clips."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dfm_jax import autoencoders, video_io
from tests.train_utils import REPO, env

pytestmark = pytest.mark.integration

CONFIG = "configs/moving_digits.py:runlocal"
TAEF2 = autoencoders.shipped_weights("taef2")


def _run(module, *args):
  cmd = [sys.executable, "-m", module, f"--config={CONFIG}", *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _main(workdir, *args):
  return _run("dfm_jax.main", f"--workdir={workdir}", *args)


def test_moving_digits_train_sample_eval(tmp_path):
  workdir = str(tmp_path / "run")
  _main(workdir, "--config.total_steps=4", "--config.sample_every=4")
  samples = os.path.join(workdir, "samples")
  for name in (
    "step_0000004.gif",
    "step_0000004.png",
    "step_0000004_stages.gif",
    "step_0000004_stages.png",
  ):
    assert os.path.isfile(os.path.join(samples, name)), name
  with Image.open(os.path.join(samples, "step_0000004.gif")) as gif:
    assert gif.n_frames == 8

  _main(workdir, "--mode=sample", "--config.sampler.num_samples=6", "--config.sampler.batch_size=6")
  base = os.path.join(samples, "final_step4")
  with np.load(base + ".npz") as f:
    assert f["images"].shape == (6, 8, 40, 40, 1) and f["images"].dtype == np.uint8
    assert f["labels"].tolist() == [0, 1, 2, 3, 4, 5]
  with Image.open(base + ".png") as sheet:  # one row per clip, one column per frame
    assert sheet.size == (8 * 42 + 2, 6 * 42 + 2)
  with Image.open(base + ".gif") as gif:
    assert gif.n_frames == 8
  assert os.path.isfile(base + ".mp4") == (video_io.mp4_codec() is not None)

  _main(
    workdir,
    "--mode=eval",
    "--config.eval.num_samples=6",
    "--config.eval.batch_size=6",
    "--config.eval.num_real=6",
    "--config.eval.frame_fid_frames=2",
  )
  (result,) = [f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".json")]
  with open(os.path.join(workdir, "eval", result)) as f:
    metrics = json.load(f)
  assert metrics["frame_fid_num_fake"] == 12 and metrics["frame_fid_num_real"] == 12
  assert np.isfinite(metrics["frame_fid"])
  assert 0.0 <= metrics["frame_accuracy"] <= 1.0 and metrics["real_frame_accuracy"] > 0.5
  assert np.isfinite(metrics["speed_ratio"])
  assert "fid" not in metrics and "fvd" not in metrics


def test_latent_video_encode_train_sample(tmp_path):
  """6 clips of 4 frames at 32 px -> TAEF2 latents [4, 4, 4, 32] (frame by frame) -> 2 training
  steps -> --mode=sample decodes the sampled latent clips into RGB frames (GIF and .npz)."""
  taef2 = ["--config.autoencoder.kind=taef2", f"--config.autoencoder.weights={TAEF2}"]
  latents = str(tmp_path / "latents")
  pixels = ["--config.data.channels=3", "--config.data.resolution=32", "--config.data.frames=4"]
  _run("dfm_jax.encode", f"--out={latents}", "--config.data.num_videos=6", *pixels, *taef2)
  with open(os.path.join(latents, "metadata.json")) as f:
    meta = json.load(f)
  assert meta["count"] == 6 and meta["latent_shape"] == [4, 4, 4, 32]

  workdir = str(tmp_path / "run")
  latent = [
    "--config.data.source=latents",
    "--config.data.resolution=4",
    "--config.data.channels=32",
    "--config.data.frames=4",
    "--config.model.patch_size=1",  # 2x2 coarse stage, 4x4 fine stage with patch 2
    *taef2,
  ]
  train = ["--config.total_steps=2", "--config.sample_every=2"]
  _main(workdir, f"--config.data.path={latents}", *latent, *train)
  for name in ("step_0000002.gif", "step_0000002_stages.gif"):  # periodic grids
    with Image.open(os.path.join(workdir, "samples", name)) as gif:  # decoded 32 px tiles
      assert gif.n_frames == 4 and gif.size[1] > 32, name
  gone = "--config.data.path=/nonexistent/latents"  # sampling reads no training data
  _main(workdir, gone, *latent, "--mode=sample", "--config.sampler.num_samples=2")
  base = os.path.join(workdir, "samples", "final_step2")
  with np.load(base + ".npz") as f:
    images, sampled = f["images"], f["latents"]
  assert images.shape == (2, 4, 32, 32, 3) and images.dtype == np.uint8
  assert sampled.shape == (2, 4, 4, 4, 32)
  ae = autoencoders.build("taef2", TAEF2)
  for clip, z in zip(images, sampled):  # each frame is its latent frame decoded on its own
    frames = (np.asarray(ae.decode(z)) + 1) * 127.5
    assert np.abs(clip.astype(np.float32) - frames).max() <= 1.0
  with Image.open(base + ".gif") as gif:
    assert gif.n_frames == 4
