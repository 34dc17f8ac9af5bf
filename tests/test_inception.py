"""FID Inception: parity with the reference TorchScript network, weight loading, torch file reader.

The reference numbers in ``fixtures/inception_parity.npz`` come from
``fixtures/make_inception_fixture.py`` (PyTorch); these tests need no torch, but they do need the
converted weights from ``python -m dfm_jax.evaluation.weights``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dfm_jax.evaluation import fid_features, inception, weights
from dfm_jax.torch_pickle import load_torch_file, load_torch_pickle

FIXTURES = Path(__file__).parent / "fixtures"
# About 10x the error bench/parity.py measures on a CPU (docs/bench_parity.json): pool3 and logits
# 9.6e-7 relative, preprocessing 3e-7 absolute. tests/test_published_numbers.py keeps it so.
REL_TOL = 1e-5
PREPROCESS_ATOL = 3e-6


def cached_params() -> dict:
  """The converted Inception weights; a missing cache fails the test with the fix."""
  if not weights.weights_path().is_file():
    pytest.fail(
      f"FID Inception weights are not cached at {weights.weights_path()}: run "
      f"`{weights.FETCH_COMMAND}` before the tests"
    )
  return fid_features.inception_params()


def nearest_upsample(img: np.ndarray, size) -> np.ndarray:
  """Same integer enlargement as the fixture script."""
  if tuple(size) == (0, 0):
    return img
  rows = np.arange(size[0]) * img.shape[0] // size[0]
  cols = np.arange(size[1]) * img.shape[1] // size[1]
  return img[rows][:, cols]


@pytest.fixture(scope="module")
def parity():
  data = dict(np.load(FIXTURES / "inception_parity.npz"))
  n = data["pool"].shape[0]
  data["images"] = [nearest_upsample(data[f"source_{i}"], data[f"size_{i}"]) for i in range(n)]
  return data


@pytest.fixture(scope="module")
def jax_outputs(parity):
  """Features of the fixture images with the cached weights plus the fixture's classifier."""
  params = dict(cached_params())
  fc_w = (parity["fc_u"] @ parity["fc_v"]).T
  params["fc"] = {"w": fc_w, "b": parity["fc_b"]}
  return fid_features.extract_features(parity["images"], batch_size=4, params=params)


def max_rel_err(actual, expected) -> float:
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_preprocessing_matches_pytorch_fid(parity):
  for i, img in enumerate(parity["images"]):
    x = np.asarray(fid_features.preprocess(fid_features.to_rgb_uint8(img[None])))
    assert x.shape == (1, 299, 299, 3)
    got = x[0].reshape(-1)[parity[f"pre_idx_{i}"]]
    np.testing.assert_allclose(
      got, parity[f"pre_val_{i}"], atol=PREPROCESS_ATOL, err_msg=f"image {i}"
    )


def test_pool3_matches_torchscript_reference(parity, jax_outputs):
  pool, _ = jax_outputs
  assert pool.shape == parity["pool"].shape == (len(parity["images"]), 2048)
  assert max_rel_err(pool, parity["pool"]) < REL_TOL
  for got, want in zip(pool, parity["pool"]):
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < REL_TOL


def test_logits_use_classifier_without_bias(parity, jax_outputs):
  _, logits = jax_outputs
  assert logits.shape == (len(parity["images"]), 1008)
  assert max_rel_err(logits, parity["logits"]) < REL_TOL


def test_array_and_list_inputs_agree(parity):
  params = cached_params()
  imgs = np.stack([parity["images"][0], parity["images"][5][:64, :64]])
  pool_arr, _ = fid_features.extract_features(imgs, batch_size=8, params=params)
  pool_list, _ = fid_features.extract_features(list(imgs), batch_size=1, params=params)
  np.testing.assert_allclose(pool_arr, pool_list, rtol=1e-5, atol=1e-5)


def test_grayscale_is_repeated_to_rgb():
  gray = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
  rgb = fid_features.to_rgb_uint8(gray)
  assert rgb.shape == (1, 3, 4, 3)
  assert (rgb == gray[..., None]).all()
  np.testing.assert_array_equal(fid_features.to_rgb_uint8(gray[..., None]), rgb)
  with pytest.raises(TypeError, match="uint8"):
    fid_features.to_rgb_uint8(gray.astype(np.float32))


def test_pytorch_fid_state_dict_maps_onto_same_params():
  shapes = json.loads((FIXTURES / "pytorch_fid_keys.json").read_text())
  state = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  params = inception.params_from_pytorch_fid(state)
  assert params["fc"]["w"].shape == (2048, 1008)
  ref = cached_params()
  assert set(params) - {"fc"} == set(ref) - {"fc"} == set(inception.conv_names())
  for name in inception.conv_names():
    for leaf in ("w", "gamma", "beta", "mean", "var"):
      assert params[name][leaf].shape == ref[name][leaf].shape, (name, leaf)
  with pytest.raises(ValueError, match="unexpected"):
    inception.params_from_pytorch_fid({**state, "extra.weight": np.zeros(1, np.float32)})


def test_compute_metrics_and_reference_cache(parity, tmp_path, monkeypatch):
  params = cached_params()
  monkeypatch.setenv("DFM_JAX_CACHE", str(tmp_path))
  gray = parity["images"][2][..., None].repeat(3, -1)
  real = np.stack([parity["images"][0][:32, :32], parity["images"][5][:32, :32], gray])
  fake = real[::-1].copy()
  out = fid_features.compute_metrics(fake, real, ref_key="fixture-32", params=params, batch_size=3)
  assert out["num_real"] == out["num_fake"] == 3
  # Same images in another order: identical statistics, so FID ~ 0 even with singular sigma.
  assert abs(out["fid"]) < 1e-6
  assert np.isfinite(out["kid"]) and out["is"] is None
  cached = fid_features.reference_statistics("fixture-32")
  features, _ = fid_features.extract_features(real, batch_size=3, params=params)
  np.testing.assert_allclose(cached["features"], features, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(cached["mu"], features.mean(0), rtol=1e-5, atol=1e-6)
  assert cached["sigma"].shape == (2048, 2048) and cached["num"] == 3
  with pytest.raises(FileNotFoundError, match="real images"):
    fid_features.reference_statistics("missing-key")
  with pytest.raises(ValueError, match="reference key"):
    fid_features.reference_statistics("../escape")


# ----------------------------------------------------------------------------- weights


def test_cache_dir_follows_env_and_fetch_is_idempotent(tmp_path, monkeypatch):
  monkeypatch.setenv("DFM_JAX_CACHE", str(tmp_path))
  assert weights.weights_path() == tmp_path / weights.WEIGHTS_FILE
  with pytest.raises(FileNotFoundError, match="python -m dfm_jax.evaluation.weights"):
    fid_features.inception_params()
  weights.weights_path().write_bytes(b"cached")

  def no_download(*args, **kwargs):
    raise AssertionError("fetch_weights downloaded although the weights were cached")

  monkeypatch.setattr(subprocess, "run", no_download)
  assert weights.fetch_weights() == weights.weights_path()
  assert weights.weights_path().read_bytes() == b"cached"


def test_convert_rejects_other_checkpoints():
  with pytest.raises(ValueError, match="neither"):
    weights.convert_torch_file(FIXTURES / "torch_files" / "state_zip.pt")


# ----------------------------------------------------------------------------- torch files


def test_reads_torch_save_zip_and_legacy_files():
  expected = dict(np.load(FIXTURES / "torch_files" / "expected.npz"))
  for name in ("state_zip.pt", "state_legacy.pt"):
    state = load_torch_file(FIXTURES / "torch_files" / name)
    teacher = {k: v for k, v in expected.items() if k.startswith("teacher.")}
    assert set(state) == set(teacher), name
    for key, want in teacher.items():
      assert state[key].shape == want.shape, (name, key)
      np.testing.assert_array_equal(state[key].astype(np.float32), want, err_msg=key)
    assert state["teacher.view"].dtype == np.int64
    assert state["teacher.flags"].dtype == np.bool_
    assert str(state["teacher.bfloat"].dtype) == "bfloat16"


def test_reads_torchscript_archive():
  expected = dict(np.load(FIXTURES / "torch_files" / "expected.npz"))
  state = load_torch_file(FIXTURES / "torch_files" / "scripted.pt")
  want = {k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith("scripted/")}
  assert set(state) == set(want)
  for key in want:
    np.testing.assert_array_equal(state[key], want[key])
  module = load_torch_pickle(FIXTURES / "torch_files" / "scripted.pt")
  assert type(module).__name__ == "Outer" and hasattr(module.inner, "lin")


def _torch_zip(tmp_path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
  path = tmp_path / "archive.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/version", "3\n")
    for key, raw in (storages or {}).items():
      zf.writestr(f"archive/data/{key}", raw)
  return path


class _RunsShell:
  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_malicious_pickle_is_rejected_without_running_code(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"weight": _RunsShell(f"touch {marker}")}, protocol=2)
  archive = _torch_zip(tmp_path, payload)
  with pytest.raises(pickle.UnpicklingError, match=r"system"):
    load_torch_file(archive)
  assert not marker.exists()

  legacy = tmp_path / "legacy.pt"
  header = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {}))
  legacy.write_bytes(header + payload)
  with pytest.raises(pickle.UnpicklingError, match=r"system"):
    load_torch_file(legacy)
  assert not marker.exists()

  builtin_eval = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."
  with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
    load_torch_file(_torch_zip(tmp_path, builtin_eval))


def _unicode(s: str) -> bytes:
  raw = s.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _int_tuple(xs) -> bytes:
  return b"(" + b"".join(b"K" + bytes([x]) for x in xs) + b"t"


def _tensor_pickle(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
  """Hand-written data.pkl: {"t": _rebuild_tensor_v2(storage '0', 0, size, stride, ...)}."""
  storage = (
    b"("
    + _unicode("storage")
    + b"ctorch\nFloatStorage\n"
    + _unicode("0")
    + _unicode("cpu")
    + b"K"
    + bytes([numel])
    + b"tQ"
  )
  rebuild = (
    b"ctorch._utils\n_rebuild_tensor_v2\n("
    + storage
    + b"K\x00"
    + _int_tuple(size)
    + _int_tuple(stride)
    + b"\x89ccollections\nOrderedDict\n)Rt"
    + b"R"
  )
  return b"\x80\x02}" + _unicode("t") + rebuild + b"s."


def test_handwritten_tensor_pickle_and_out_of_bounds_stride(tmp_path):
  raw = np.arange(6, dtype=np.float32).tobytes()
  ok = load_torch_file(_torch_zip(tmp_path, _tensor_pickle(6, (2, 3), (1, 2)), {"0": raw}))
  np.testing.assert_array_equal(ok["t"], np.arange(6, dtype=np.float32).reshape(3, 2).T)
  bad = _torch_zip(tmp_path, _tensor_pickle(6, (2, 3), (3, 2)), {"0": raw})
  with pytest.raises(pickle.UnpicklingError, match="exceeds its storage"):
    load_torch_file(bad)


def test_not_a_torch_file(tmp_path):
  path = tmp_path / "junk.pt"
  path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="neither"):
    load_torch_file(path)
  with zipfile.ZipFile(tmp_path / "nodata.zip", "w") as zf:
    zf.writestr("readme.txt", "hi")
  with pytest.raises(pickle.UnpicklingError, match="data.pkl"):
    load_torch_file(tmp_path / "nodata.zip")
