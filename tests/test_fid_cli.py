"""``python -m dfm_jax.fid`` end to end on tiny image folders and .npz files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfm_jax import fid
from dfm_jax.evaluation import fid_features, weights

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
    [sys.executable, "-m", "dfm_jax.fid", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def pattern_images(seed: int, n: int, size: int) -> np.ndarray:
  """Smooth uint8 RGB images ``[n, size, size, 3]``."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  f = rng.uniform(1, 6, (n, 3, 2))
  phase = rng.uniform(0, 2 * np.pi, (n, 3))
  waves = np.sin(
    2 * np.pi * (f[..., 0, None, None] * xx + f[..., 1, None, None] * yy) + phase[..., None, None]
  )
  return np.round(127.5 + 127.5 * waves).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
  root = tmp_path_factory.mktemp("fid_cli")
  folder = root / "generated"
  (folder / "nested").mkdir(parents=True)
  a = pattern_images(0, 4, 40)
  Image.fromarray(a[0]).save(folder / "0.png")
  Image.fromarray(a[1]).save(folder / "1.PNG")
  Image.fromarray(a[2][..., 0]).save(folder / "nested" / "gray.png")
  Image.fromarray(a[3]).save(folder / "nested" / "3.bmp")
  (folder / "notes.txt").write_text("ignored: not an image")
  b = pattern_images(1, 5, 48)
  np.savez(root / "reference.npz", images=b)
  return folder, root / "reference.npz"


def test_load_images_folder_and_npz(image_sets, tmp_path):
  folder, npz = image_sets
  images = fid.load_images(folder)
  assert isinstance(images, np.ndarray) and images.shape == (4, 40, 40, 3)
  assert (images[3] == images[3][..., :1]).all()  # nested/gray.png, sorted last, as RGB
  np.testing.assert_array_equal(fid.load_images(npz), np.load(npz)["images"])
  np.savez(tmp_path / "first.npz", stuff=np.zeros((2, 8, 8, 3), np.uint8))
  assert fid.load_images(tmp_path / "first.npz").shape == (2, 8, 8, 3)
  np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(fid.InputError, match="uint8"):
    fid.load_images(tmp_path / "float.npz")


@pytest.mark.integration
def test_cli_prints_metrics_json_last(image_sets):
  if not weights.weights_path().is_file():
    pytest.fail(
      f"FID Inception weights are not cached at {weights.weights_path()}: run "
      f"`{weights.FETCH_COMMAND}` before the tests"
    )
  folder, npz = image_sets
  proc = run_cli(str(folder), str(npz), "--batch-size", "3")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {"fid", "kid", "is"} <= set(result)
  assert result["num_a"] == 4 and result["num_b"] == 5
  assert "inception features" in proc.stderr

  expected = fid_features.compute_metrics(
    fid.load_images(folder), fid.load_images(npz), batch_size=3
  )
  assert result["fid"] == pytest.approx(expected["fid"], rel=1e-4)
  assert result["fid"] > 1.0
  assert result["kid"] == pytest.approx(expected["kid"], rel=1e-3, abs=1e-6)
  if expected["is"] is None:
    assert result["is"] is None
  else:
    assert result["is"] == pytest.approx(expected["is"], rel=1e-4)


def test_cli_unreadable_image_names_the_file(image_sets, tmp_path):
  _, npz = image_sets
  bad = tmp_path / "broken"
  bad.mkdir()
  Image.fromarray(pattern_images(2, 1, 16)[0]).save(bad / "fine.png")
  (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
  proc = run_cli(str(bad), str(npz))
  assert proc.returncode != 0
  assert str(bad / "corrupt.png") in proc.stderr
  assert proc.stdout.strip() == ""


def test_cli_missing_path_is_a_clear_error(image_sets, tmp_path):
  folder, _ = image_sets
  missing = tmp_path / "does-not-exist"
  proc = run_cli(str(folder), str(missing))
  assert proc.returncode != 0
  assert f"path does not exist: {missing}" in proc.stderr
