"""DINOv2 in Flax against the reference PyTorch model (fixtures from make_dinov2_fixture.py).

The reference CLS features were computed by the official DINOv2 code on a reduced model with
random weights; the committed state dict is read here through the numpy-only loader, so these
tests need no torch.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfm_jax.evaluation import dinov2 as D
from dfm_jax.torch_pickle import load_torch_file

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "dinov2_tiny.pth"


def _fixture_module():
  spec = importlib.util.spec_from_file_location(
    "make_dinov2_fixture", FIXTURES / "make_dinov2_fixture.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


FX = _fixture_module()


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURES / "dinov2_tiny_reference.npz") as data:
    return dict(data)


@pytest.fixture(scope="module")
def tiny_config(reference):
  return D.DinoV2Config(
    embed_dim=int(reference["config_embed_dim"]),
    depth=int(reference["config_depth"]),
    num_heads=int(reference["config_num_heads"]),
  )


@pytest.fixture(scope="module")
def model(tiny_config):
  return D.load_dinov2(CHECKPOINT, tiny_config)


def _inputs(name):
  seed = list(FX.INPUTS).index(name)
  return FX.images(*FX.INPUTS[name], seed=seed)


# About 10x the 1.4e-6 bench/parity.py measures on a CPU (docs/bench_parity.json).
REL_TOL = 1.5e-5


def _assert_close(actual, expected, rel=REL_TOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  err = np.abs(actual - expected).max() / np.abs(expected).max()
  assert err <= rel, f"max relative error {err:.2e}"


@pytest.mark.parametrize("name", list(FX.INPUTS))
def test_cls_features_match_reference(model, reference, name):
  # fdd224 resamples the 37x37 position grid to 16x16, native518 uses it as is,
  # rect126x196 resamples to 9x14, up560 to 40x40.
  _assert_close(model(FX.normalise(_inputs(name))), reference[f"cls_{name}"])


def test_all_tokens_match_reference(model, reference):
  tokens = model.forward_tokens(FX.normalise(_inputs("rect126x196")))
  _assert_close(tokens, reference["tokens_rect126x196"])


def test_fdd_features_batched_match_reference(model, reference):
  # 224x224 inputs skip the resize, so preprocessing reduces to the ImageNet normalisation.
  images = _inputs("fdd224")
  repeated = np.concatenate([images, images[::-1], images[:1]])
  feats = D.dinov2_features(model, repeated, batch_size=2)
  expected = reference["cls_fdd224"]
  _assert_close(feats, np.concatenate([expected, expected[::-1], expected[:1]]))
  assert D.dinov2_features(model, images[:0]).shape == (0, 128)


def test_official_checkpoint_layout():
  official = json.loads((FIXTURES / "dinov2_official_shapes.json").read_text())
  for arch in ("vits14", "vitb14"):
    shapes = {k: list(v) for k, v in D.expected_checkpoint_shapes(arch).items()}
    ignored = set(official[arch]) - set(shapes)
    assert ignored == {"mask_token"}
    assert shapes == {k: v for k, v in official[arch].items() if k not in ignored}


def test_loader_reports_mismatches(tiny_config):
  state = load_torch_file(CHECKPOINT)

  missing = {k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}
  with pytest.raises(KeyError, match=r"missing keys blocks\.1\.ls2\.gamma; unexpected keys none"):
    D.dinov2_from_state_dict(missing, tiny_config)

  extra = dict(state, register_tokens=np.zeros((1, 4, 128), np.float32))
  with pytest.raises(KeyError, match="unexpected keys register_tokens"):
    D.dinov2_from_state_dict(extra, tiny_config)

  bad = dict(state)
  bad["blocks.0.mlp.fc1.weight"] = np.zeros((256, 128), np.float32)
  shapes = r"blocks\.0\.mlp\.fc1\.weight.*\(256, 128\).*\(512, 128\)"
  with pytest.raises(ValueError, match=shapes):
    D.dinov2_from_state_dict(bad, tiny_config)

  with pytest.raises(KeyError, match=r"missing keys blocks\.2\."):
    D.dinov2_from_state_dict(state, "vits14")
  with pytest.raises(ValueError, match="unknown DINOv2 architecture"):
    D.dinov2_from_state_dict(state, "vitg14")
  with pytest.raises(ValueError, match="no DINOv2 architecture has width"):
    D.infer_architecture(state)  # the tiny test network is none of the official sizes
  assert (
    D.infer_architecture(
      {"cls_token": np.zeros((1, 1, 1024)), **{f"blocks.{i}.norm1.weight": 0 for i in range(24)}}
    )
    == "vitl14"
  )


@pytest.mark.parametrize("size", [32, 300])
def test_preprocessing_matches_pil_bicubic(size):
  images = FX.images(2, size, size, seed=5)
  out = np.asarray(D.preprocess_for_fdd(images))
  assert out.shape == (2, 224, 224, 3)
  pil = np.stack(
    [np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in images]
  )
  # PIL rounds to 8 bits between its two 1-D passes; agreement is up to a few levels.
  ours = (out * np.array(D.IMAGENET_STD) + np.array(D.IMAGENET_MEAN)) * 255
  diff = np.abs(ours - pil)
  assert diff.mean() < 0.5 and diff.max() <= 6


def test_grayscale_is_repeated_to_rgb():
  gray = FX.images(1, 32, 32, seed=6)[..., :1]
  np.testing.assert_allclose(
    D.preprocess_for_fdd(gray), D.preprocess_for_fdd(np.repeat(gray, 3, axis=-1))
  )


def test_frechet_distance(model):
  a, b = FX.images(8, 224, 224, seed=7), FX.images(8, 224, 224, seed=8)
  same = D.dinov2_frechet_distance(model, a, a, batch_size=4)
  different = D.dinov2_frechet_distance(model, a, 255 - b, batch_size=4)
  assert same < 1e-6 * different and different > 0
