"""The latent path as a user runs it: encode real digits with the real TAEF2 weights, train a
latent DFM, then sample and evaluate decoded pictures without the training data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.train_utils import REPO, env

pytestmark = pytest.mark.integration
CONFIG = "configs/latent_demo.py:runlocal"


def _run(*args):
  proc = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_encode_train_sample_eval_in_latent_space(tmp_path):
  latents = str(tmp_path / "latents")
  _run("-m", "dfm_jax.encode", f"--config={CONFIG}", f"--out={latents}", "--num_examples=64")
  with open(os.path.join(latents, "metadata.json")) as f:
    meta = json.load(f)
  assert meta["count"] == 64 and list(meta["latent_shape"]) == [8, 8, 32]

  workdir = str(tmp_path / "run")
  _run(
    "-m",
    "dfm_jax.main",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    f"--config.data.path={latents}",
    "--config.sample_every=6",
  )
  # The periodic grid is decoded to RGB pixels (64x64 tiles), not a picture of latents.
  with Image.open(os.path.join(workdir, "samples", "step_0000006.png")) as grid:
    assert grid.mode == "RGB" and grid.size[0] == 10 * 66 + 2

  # Sample and eval need no training data: point data.path somewhere that does not exist.
  gone = "--config.data.path=/nonexistent/latents"
  _run("-m", "dfm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", gone, "--mode=sample")
  data = np.load(os.path.join(workdir, "samples", "final_step6.npz"))
  assert data["images"].shape == (12, 64, 64, 3) and data["latents"].shape == (12, 8, 8, 32)
  proc = _run(
    "-m", "dfm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", gone, "--mode=eval"
  )
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert np.isfinite(result["fid"]) and result["num_fake"] == 20 and result["num_real"] == 40
