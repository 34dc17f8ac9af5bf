"""Bad inputs give one clear line, not a traceback: ``python -m dfm_jax.fid`` (.npz keys,
layouts, damaged files), ``python -m dfm_jax.evaluation.weights --from-pth`` (damaged or foreign
files), and mixed image sizes under ``crop='pad'`` (one warning with the counts)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfm_jax import fid
from dfm_jax.data import sources, transforms
from dfm_jax.evaluation import inception, weights

REPO = Path(__file__).resolve().parents[1]
TORCH_FILES = REPO / "tests" / "fixtures" / "torch_files"


def run_module(module: str, *args: str, env_extra: dict | None = None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(env_extra or {})
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def assert_one_line_error(proc, code: int, *needles: str):
  assert proc.returncode == code, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert proc.stdout.strip() == ""


@pytest.fixture(scope="module")
def good_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp("fid_ok") / "ok.npz"
  np.savez(path, images=np.zeros((3, 8, 8, 3), np.uint8))
  return path


# ------------------------------------------------------------------------------------- fid


def bad_npz_cases(root: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
  """{case: (file, substrings of its error line)}."""
  cases = {}
  p = root / "unknown_keys.npz"
  np.savez(p, pictures=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(2, np.int32))
  cases["unknown-keys"] = (p, ("no image array", "images, samples, arr_0", "pictures, labels"))
  p = root / "chw.npz"
  np.savez(p, images=np.zeros((4, 3, 16, 16), np.uint8))
  cases["channels-first"] = (p, ("(4, 3, 16, 16)", "channels-first", "transpose(0, 2, 3, 1)"))
  p = root / "five.npz"
  np.savez(p, images=np.zeros((4, 16, 16, 5), np.uint8))
  cases["five-channels"] = (p, ("(4, 16, 16, 5)", "5 channels"))
  p = root / "float.npz"
  np.savez(p, images=np.zeros((4, 16, 16, 3), np.float32))
  cases["float"] = (p, ("uint8", "float32"))
  p = root / "random.npz"
  p.write_bytes(np.random.default_rng(0).bytes(4096))
  cases["random-bytes"] = (p, ("not an .npz file",))
  p = root / "empty.npz"
  p.write_bytes(b"")
  cases["empty-file"] = (p, ("not an .npz file", "empty"))
  p = root / "truncated.npz"
  np.savez_compressed(
    p, images=np.random.default_rng(0).integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)
  )
  data = p.read_bytes()
  p.write_bytes(data[: len(data) // 2])
  cases["truncated"] = (p, (str(p),))
  p = root / "truncated_member.npz"
  np.savez_compressed(
    p, images=np.random.default_rng(1).integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)
  )
  data = bytearray(p.read_bytes())
  data[200:400] = bytes(200)  # inside the compressed member; the zip directory survives
  p.write_bytes(bytes(data))
  cases["damaged-member"] = (p, (str(p),))
  return cases


@pytest.fixture(scope="module")
def bad_npz(tmp_path_factory):
  return bad_npz_cases(tmp_path_factory.mktemp("fid_bad"))


@pytest.mark.parametrize(
  "case",
  [
    "unknown-keys",
    "channels-first",
    "five-channels",
    "float",
    "random-bytes",
    "empty-file",
    "truncated",
    "damaged-member",
  ],
)
def test_load_images_names_the_problem(bad_npz, case):
  path, needles = bad_npz[case]
  with pytest.raises(fid.InputError) as err:
    fid.load_images(path)
  message = str(err.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message


@pytest.mark.parametrize("case", ["unknown-keys", "channels-first", "random-bytes", "truncated"])
def test_fid_cli_prints_one_error_line(bad_npz, good_npz, case):
  path, needles = bad_npz[case]
  assert_one_line_error(run_module("dfm_jax.fid", str(good_npz), str(path)), 2, *needles)


def test_fid_npz_keys_in_order_and_a_single_array(tmp_path):
  a, b = np.zeros((2, 4, 4, 3), np.uint8), np.ones((2, 4, 4, 3), np.uint8)
  np.savez(tmp_path / "samples.npz", labels=np.zeros(2, np.int32), samples=a)
  np.testing.assert_array_equal(fid.load_images(tmp_path / "samples.npz"), a)
  np.savez(tmp_path / "both.npz", samples=b, images=a)
  np.testing.assert_array_equal(fid.load_images(tmp_path / "both.npz"), a)
  np.savez(tmp_path / "positional.npz", b)
  np.testing.assert_array_equal(fid.load_images(tmp_path / "positional.npz"), b)
  np.savez(tmp_path / "single.npz", whatever=b)
  np.testing.assert_array_equal(fid.load_images(tmp_path / "single.npz"), b)
  np.save(tmp_path / "plain.npy", a)
  os.rename(tmp_path / "plain.npy", tmp_path / "plain.npz")
  np.testing.assert_array_equal(fid.load_images(tmp_path / "plain.npz"), a)
  np.savez(tmp_path / "labels.npz", labels=np.zeros(2, np.int32))
  with pytest.raises(fid.InputError, match=r"'labels' must be uint8 images"):
    fid.load_images(tmp_path / "labels.npz")


# --------------------------------------------------------------------------------- weights


def bad_torch_files(root: Path) -> dict[str, Path]:
  files = {}
  files["random-bytes"] = root / "random.pth"
  files["random-bytes"].write_bytes(np.random.default_rng(0).bytes(5000))
  data = (TORCH_FILES / "state_zip.pt").read_bytes()
  files["truncated-zip"] = root / "truncated_zip.pth"
  files["truncated-zip"].write_bytes(data[: len(data) // 2])
  data = (TORCH_FILES / "state_legacy.pt").read_bytes()
  files["truncated-legacy"] = root / "truncated_legacy.pth"
  files["truncated-legacy"].write_bytes(data[: len(data) // 2])
  files["other-network"] = TORCH_FILES / "state_zip.pt"
  files["torchscript-other-network"] = TORCH_FILES / "scripted.pt"
  files["empty"] = root / "empty.pth"
  files["empty"].write_bytes(b"")
  return files


@pytest.mark.parametrize(
  "case",
  [
    "random-bytes",
    "truncated-zip",
    "truncated-legacy",
    "other-network",
    "torchscript-other-network",
    "empty",
  ],
)
def test_weights_from_bad_pth_exits_2_with_one_line(tmp_path, monkeypatch, capsys, case):
  monkeypatch.setenv("DFM_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("DFM_JAX_DEBUG", raising=False)
  (tmp_path / "cache").mkdir()
  weights.weights_path().write_bytes(b"good weights")
  path = bad_torch_files(tmp_path)[case]
  assert weights.main(["--from-pth", str(path)]) == 2
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert out == "" and len(lines) == 1, err
  assert lines[0].startswith(f"error: cannot convert {path}: ")
  assert weights.weights_path().read_bytes() == b"good weights"  # the cache is untouched
  if case == "other-network":
    assert "neither" in lines[0] and "teacher.bias" in lines[0]
  if case == "truncated-legacy":
    assert "truncated" in lines[0]


def test_weights_cli_has_no_traceback(tmp_path):
  path = bad_torch_files(tmp_path)["truncated-zip"]
  proc = run_module(
    "dfm_jax.evaluation.weights",
    "--from-pth",
    str(path),
    env_extra={"DFM_JAX_CACHE": str(tmp_path / "cache")},
  )
  assert_one_line_error(proc, 2, "cannot convert", str(path))
  assert not (tmp_path / "cache").exists()


def pytorch_fid_state(fill: float = 0.01) -> dict[str, np.ndarray]:
  """A state dict with pytorch-fid's names and shapes (constant values)."""
  keys = json.loads((REPO / "tests" / "fixtures" / "pytorch_fid_keys.json").read_text())
  return {k: np.full(shape, fill, np.float32) for k, shape in keys.items()}


def test_converted_params_are_checked():
  state = pytorch_fid_state()
  weights.check_params(inception.params_from_pytorch_fid(state))
  reshaped = dict(state)
  reshaped["Mixed_6a.branch3x3.conv.weight"] = np.zeros((384, 200, 3, 3), np.float32)
  with pytest.raises(ValueError, match="do not form the Inception network"):
    weights.check_params(inception.params_from_pytorch_fid(reshaped))
  nan = dict(state)
  nan["Conv2d_4a_3x3.bn.running_var"] = np.full_like(nan["Conv2d_4a_3x3.bn.running_var"], np.nan)
  with pytest.raises(ValueError, match="Conv2d_4a_3x3: var holds non-finite"):
    weights.check_params(inception.params_from_pytorch_fid(nan))


# ------------------------------------------------------------------------------ crop='pad'


def write_folder(root: Path, sizes: list[int]) -> Path:
  root.mkdir()
  for i, s in enumerate(sizes):
    Image.fromarray(np.full((s, s, 3), 200, np.uint8)).save(root / f"{i:03d}.png")
  return root


def decode_all(root: Path, resolution: int) -> list[np.ndarray]:
  source = sources.DecodedSource(sources.FolderRecords(str(root), 3), resolution, "pad", False)
  return [source[i]["image"] for i in range(len(source))]


def test_mixed_sizes_under_pad_warn_once_with_counts(tmp_path, caplog):
  transforms.PAD_SIZES.reset()
  root = write_folder(tmp_path / "mixed", [32] * 5 + [4] + [32] * 3 + [4])
  with caplog.at_level(logging.WARNING, logger="dfm_jax.data.transforms"):
    images = decode_all(root, 32)
  assert all(im.shape == (32, 32, 3) for im in images)
  assert images[5][14:18, 14:18].min() == 200 and images[5][:14].max() == 0  # padded, centred
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1, lines
  assert "005.png is 4x4" in lines[0] and "32x32: 5, 4x4: 1" in lines[0]
  assert "1 padded up" in lines[0]
  assert transforms.padded_sizes() == {(32, 32): 8, (4, 4): 2}
  transforms.PAD_SIZES.reset()


def test_one_size_under_pad_is_quiet(tmp_path, caplog):
  transforms.PAD_SIZES.reset()
  root = write_folder(tmp_path / "digits", [28] * 4)
  with caplog.at_level(logging.WARNING, logger="dfm_jax.data.transforms"):
    images = decode_all(root, 32)
  assert all(im.shape == (32, 32, 3) for im in images)
  assert not caplog.records
  transforms.PAD_SIZES.reset()


@pytest.mark.parametrize(
  "change, message",
  [
    (
      lambda c: c.eval.reference.update(dict(source="bogus")),
      "eval.reference.source: unknown data source 'bogus'",
    ),
    (lambda c: c.eval.update(dict(real_split="test")), "split 'test' requested"),
    (
      lambda c: c.eval.update(dict(num_real=9000)),
      "eval.num_real=9000 but the reference set (mnist5k, split 'train') holds 5000 pictures",
    ),
  ],
)
def test_eval_settings_are_refused_before_sampling(tmp_path, change, message):
  """--mode=eval (and training with eval.every) checks the reference set before it samples:
  the workdir has no checkpoint, so reaching the restore would raise something else."""
  from dfm_jax import train  # pylint: disable=g-import-not-at-top
  from dfm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from tests.test_configs import load  # pylint: disable=g-import-not-at-top

  config = load("default.py", "dfm")
  evaluate.check_eval_config(config)  # the shipped settings pass
  change(config)
  with pytest.raises(ValueError, match="invalid configuration") as e:
    evaluate.eval_mode(config, str(tmp_path))
  assert message in str(e.value)
  config.eval.every = 1
  config.total_steps = 2
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="invalid configuration") as e:
    train.train(config, str(workdir))
  assert message in str(e.value)
  assert not workdir.exists()
