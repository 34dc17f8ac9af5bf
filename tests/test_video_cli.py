"""The video command lines as a user runs them: configs/moving_digits.py:runlocal trains a few
steps (periodic GIF grid and stage previews), then --mode=sample writes the GIF grid, the PNG
contact sheet, the MP4 (where PyAV has an encoder) and the .npz of [N, T, H, W, C] clips, and
--mode=eval scores a handful of clips with the video metrics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dfm_jax import video_io
from tests.train_utils import REPO, env

pytestmark = pytest.mark.integration

CONFIG = "configs/moving_digits.py:runlocal"


def _main(workdir, *args):
  cmd = [sys.executable, "-m", "dfm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


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
