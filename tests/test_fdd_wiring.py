"""FDD is reachable: the `fdd` metric of `--mode=eval` and `python -m dfm_jax.fid --fdd-weights`
compute the Frechet distance of DINOv2 CLS features (here the tiny reference-checked network)."""

import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np

from dfm_jax.evaluation import dinov2, scores

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def _tiny_model():
  with np.load(FIXTURES / "dinov2_tiny_reference.npz") as ref:
    cfg = dinov2.DinoV2Config(
      embed_dim=int(ref["config_embed_dim"]),
      depth=int(ref["config_depth"]),
      num_heads=int(ref["config_num_heads"]),
    )
  return dinov2.load_dinov2(FIXTURES / "dinov2_tiny.pth", cfg)


def _config(weights: str):
  c = ml_collections.ConfigDict()
  c.eval = ml_collections.ConfigDict({"fdd_weights": weights, "metrics": ("fdd",)})
  c.data = ml_collections.ConfigDict({"frames": 0})
  return c


def test_fdd_metric_is_enabled_by_weights_and_equals_the_direct_distance(monkeypatch):
  assert not scores.FDD.enabled(_config(""))
  assert scores.FDD.check_config(_config("/nonexistent/dinov2.pth"))
  config = _config(str(FIXTURES / "dinov2_tiny.pth"))
  assert [type(m) for m in scores.active_metrics(config)] == [scores.FDD]
  model = _tiny_model()
  monkeypatch.setattr(dinov2, "load_dinov2", lambda path, cfg=None: model)
  rng = np.random.default_rng(0)
  fake = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  real = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  ctx = scores.EvalContext(config, fake, np.zeros(6, np.int32), lambda: real)
  got = scores.evaluate(ctx, scores.active_metrics(config))
  want = dinov2.dinov2_frechet_distance(model, fake, real)
  np.testing.assert_allclose(got["fdd"], want, rtol=1e-6)
  assert want > 0


def test_fid_cli_names_a_checkpoint_of_no_official_size(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  np.savez(tmp_path / "a.npz", images=images)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfm_jax.fid",
      str(tmp_path / "a.npz"),
      str(tmp_path / "a.npz"),
      "--fdd-weights",
      str(tmp_path / "none.pth"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2 and "--fdd-weights: no such file" in proc.stderr
  assert "Traceback" not in proc.stderr
