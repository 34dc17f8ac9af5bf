"""Every shipped config's ``runlocal`` variant trains, saves and samples on a CPU, with no data or
weights beyond the repository: what is not on this machine (the big configs' ``gs://`` latents,
the FLUX.1 autoencoder file) is replaced by synthetic data and a stand-in autoencoder."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.train_utils import REPO, env

pytestmark = pytest.mark.integration

# latent_demo trains on the latents its encode step writes first (tests/test_latent_cli.py runs
# encode, train, sample and eval); every other config runs from its runlocal variant alone.
CONFIGS = sorted(
  n[:-3]
  for n in os.listdir(os.path.join(REPO, "configs"))
  if n[0].isalpha() and n != "latent_demo.py"
)


def test_every_config_is_listed():
  assert {"default", "imagenet512", "imagenet1024", "kinetics700"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_runlocal_trains_saves_and_samples_anywhere(name, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfm_jax.main",
      f"--config={os.path.join(REPO, 'configs', name + '.py')}:runlocal",
      f"--workdir={workdir}",
      "--config.sample_every=6",
    ],
    cwd=tmp_path,  # nothing from the checkout but the package and the config
    env={
      **env(),
      "PYTHONPATH": os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH")))),
    },
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 6/6" in proc.stdout
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())[-1] == 6
  grid = np.asarray(Image.open(workdir / "samples" / "step_0000006.png"))
  assert grid.ndim == 3 and len(np.unique(grid)) > 16  # samples side by side, not a blank grid
