"""`python -m dfm_jax.encode`: pixels -> latent shards (flip, stats, resume, errors), with a cheap
stand-in autoencoder in-process and the real TAEF2 weights end to end (integration)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dfm_jax import config_defaults
from dfm_jax import data as D
from dfm_jax import autoencoders, encode
from dfm_jax.data import latent_shards as LS
from dfm_jax.data.transforms import to_unit_range

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAEF2 = autoencoders.shipped_weights("taef2")


class PoolAE(nnx.Module):
  """Stand-in autoencoder: 8x8 average pooling and a fixed 3 -> 4 channel projection."""

  name, latent_channels, downsample, scale, shift = "pool", 4, 8, 1.0, 0.0

  def __init__(self):
    w = np.random.default_rng(0).normal(size=(3, 4)) * [[1, 2, 3, 4]]
    self.w = nnx.Param(jnp.asarray(w, jnp.float32))

  def encode_traced(self, x):
    """x: [B, H, W, 3] -> [B, H/8, W/8, 4]."""
    b, h, w, _ = x.shape
    return x.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4)) @ self.w[...]


def folder_config(root, **data):
  c = config_defaults.base_config()
  c.data.update(
    dict(
      source="folder",
      path=str(root),
      resolution=16,
      channels=3,
      crop="center",
      num_classes=2,
      **data,
    )
  )
  c.autoencoder.batch_size = 4  # rounded up to the 8 test devices
  return c


@pytest.fixture
def image_folder(tmp_path):
  """11 random 16x16 RGB PNGs in two class folders; returns (root, images uint8, labels)."""
  rng = np.random.default_rng(0)
  images, labels = [], []
  for i in range(11):
    label = int(i >= 6)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "px" / f"c{label}", exist_ok=True)
    Image.fromarray(image).save(tmp_path / "px" / f"c{label}" / f"{i:02d}.png")
    images.append(image)
    labels.append(label)
  return tmp_path / "px", np.stack(images), np.array(labels, np.int32)


def read_dir(path) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      full = os.path.join(root, f)
      with open(full, "rb") as fh:
        out[os.path.relpath(full, path)] = fh.read()
  return out


def test_flipped_encoding_matches_direct_encoding_and_numpy_stats(image_folder, tmp_path):
  root, images, labels = image_folder
  out = str(tmp_path / "lat")
  ae = PoolAE()
  meta = encode.encode_dataset(folder_config(root), out, flip=True, shard_size=4, autoencoder=ae)
  assert meta["count"] == 22 and meta["flip"] and meta["latent_shape"] == [2, 2, 4]
  assert [s["records"] for s in meta["shards"]] == [4] * 5 + [2]
  stored, stored_labels = LS.LatentShards(out).arrays()
  x = to_unit_range(images)
  direct = np.asarray(ae.encode_traced(x))
  mirrored = np.asarray(ae.encode_traced(x[:, :, ::-1]))
  np.testing.assert_allclose(stored[0::2], direct, atol=2e-3, rtol=1e-3)
  np.testing.assert_allclose(stored[1::2], mirrored, atol=2e-3, rtol=1e-3)
  np.testing.assert_array_equal(stored_labels, np.repeat(labels, 2))
  all64 = stored.astype(np.float64)
  np.testing.assert_allclose(meta["channel_mean"], all64.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(meta["channel_std"], all64.std(axis=(0, 1, 2)), rtol=1e-12)
  assert meta["source"]["source"] == "folder" and meta["autoencoder"]["kind"] == "pool"
  with open(os.path.join(out, LS.METADATA)) as f:
    assert json.load(f) == meta


def test_interrupted_encoding_resumes_to_the_same_bytes(image_folder, tmp_path, monkeypatch):
  root = image_folder[0]
  c = folder_config(root)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  encode.encode_dataset(c, straight, shard_size=3, autoencoder=PoolAE())

  real_write, calls = LS._write_array_record, []

  def crash_on_third(path, latents, labels):
    calls.append(path)
    if len(calls) == 3:  # a half-written shard, then the process dies
      real_write(path, latents[:1], labels[:1])
      raise KeyboardInterrupt
    real_write(path, latents, labels)

  monkeypatch.setattr(LS, "_write_array_record", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    encode.encode_dataset(c, resumed, shard_size=3, autoencoder=PoolAE())
  assert sorted(LS.completed_shards(resumed, 4)) == [0, 1]
  assert not os.path.exists(os.path.join(resumed, LS.METADATA))
  monkeypatch.setattr(LS, "_write_array_record", real_write)
  encode.encode_dataset(c, resumed, shard_size=3, autoencoder=PoolAE())
  assert read_dir(resumed) == read_dir(straight)  # no .tmp left, same bytes everywhere
  with pytest.raises(ValueError, match="other settings.*shard_size"):
    encode.encode_dataset(c, resumed, shard_size=5, autoencoder=PoolAE())


def test_corrupt_images_follow_skip_corrupt(image_folder, tmp_path):
  root = image_folder[0]
  with open(root / "c0" / "03.png", "wb") as f:
    f.write(b"not a png")
  with pytest.raises(D.CorruptRecordError, match=r"03\.png.*skip_corrupt"):
    encode.encode_dataset(folder_config(root), str(tmp_path / "a"), autoencoder=PoolAE())
  meta = encode.encode_dataset(
    folder_config(root, skip_corrupt=True), str(tmp_path / "b"), autoencoder=PoolAE()
  )
  assert meta["count"] == 11  # record 3 repeats its successor


@pytest.mark.parametrize(
  "change,message",
  [
    (lambda c: c.data.update(dict(source="latents", path="x.npz")), "holds no pixels"),
    (lambda c: c.data.update(dict(channels=1)), "data.channels=1.*RGB"),
    (lambda c: c.data.update(dict(resolution=12)), "not a multiple of .* 8x"),
    (lambda c: c.autoencoder.update(dict(batch_size=0)), "batch_size must be >= 1"),
  ],
)
def test_bad_settings_are_one_clear_error(image_folder, tmp_path, change, message):
  c = folder_config(image_folder[0])
  change(c)
  with pytest.raises(ValueError, match=message):
    encode.encode_dataset(c, str(tmp_path / "o"), autoencoder=PoolAE())


def test_autoencoder_block_is_checked():
  c = config_defaults.base_config()
  with pytest.raises(ValueError, match="autoencoder.kind is empty"):
    autoencoders.from_config(c.autoencoder)
  c.autoencoder.kind = "sd"  # no weights ship for it
  with pytest.raises(ValueError, match="autoencoder.weights is empty"):
    autoencoders.from_config(c.autoencoder)
  c.autoencoder.kind = "taef2"  # its weights ship with the package
  assert autoencoders.from_config(c.autoencoder).latent_channels == 32
  c.autoencoder.weights = "/nonexistent/taef2"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    autoencoders.from_config(c.autoencoder)


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
  """The shipped files are checked against their sha256 on every use: a flipped byte is named,
  never loaded."""
  folder = tmp_path / "weights" / "taef2"
  shutil.copytree(autoencoders.shipped_weights("taef2"), folder)
  data = bytearray((folder / "taef2_decoder.pth").read_bytes())
  data[len(data) // 2] ^= 1
  (folder / "taef2_decoder.pth").write_bytes(bytes(data))
  monkeypatch.setattr(autoencoders, "__file__", str(tmp_path / "__init__.py"))
  with pytest.raises(ValueError, match="taef2_decoder.pth is damaged"):
    autoencoders.shipped_weights("taef2")
  with pytest.raises(ValueError, match="no weights ship with the package for autoencoder 'sd'"):
    autoencoders.shipped_weights("sd")


def test_encode_data_block_takes_precedence():
  c = config_defaults.base_config()
  c.data.source = "latents"
  with pytest.raises(ValueError, match="data.source='latents' holds no pixels"):
    encode.pixel_data_config(c)
  c.encode = {"data": D.default_data_config()}
  assert encode.pixel_data_config(c).source == "mnist5k"


# ---------------------------------------------------------------------------------------------
# The real TAEF2 weights, end to end (seconds per hundred 64x64 images on a CPU).


def mnist_config(resolution: int):
  c = config_defaults.base_config()
  c.data.update(dict(source="mnist5k", resolution=resolution, channels=3, crop="pad"))
  c.autoencoder.update(dict(kind="taef2", weights=TAEF2, batch_size=32))
  return c


@pytest.mark.integration
def test_taef2_shards_train_like_a_direct_encoding(tmp_path):
  c = mnist_config(64)
  out = str(tmp_path / "mnist_taef2")
  ae = autoencoders.from_config(c.autoencoder)
  meta = encode.encode_dataset(c, out, num_examples=200, shard_size=64, autoencoder=ae)
  assert meta["count"] == 200 and meta["latent_shape"] == [8, 8, 32]
  assert meta["autoencoder"]["kind"] == "taef2" and len(meta["shards"]) == 4

  images, labels = D.open_source(c.data).arrays()
  direct = np.concatenate(
    [np.asarray(ae.encode(to_unit_range(images[i : i + 50]))) for i in range(0, 200, 50)]
  )
  stored, _ = LS.LatentShards(out).arrays()
  all64 = stored.astype(np.float64)
  np.testing.assert_allclose(meta["channel_mean"], all64.mean(axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(meta["channel_std"], all64.std(axis=(0, 1, 2)), rtol=1e-9)

  latent = c.data.copy_and_resolve_references()
  latent.update(dict(source="latents", path=out, resolution=8, channels=32))
  it = D.make_train_iterator(latent, global_batch_size=50, seed=0)
  seen = []
  for _ in range(4):  # one epoch
    batch = next(it)
    assert batch["image"].shape == (50, 8, 8, 32) and batch["image"].dtype == np.float32
    for z, label in zip(batch["image"], batch["label"]):
      err = np.abs(direct - z).reshape(200, -1).max(axis=1)
      k = int(np.argmin(err))
      assert err[k] <= 2e-3 * max(1.0, float(np.abs(z).max())), err[k]
      assert label == labels[k]
      seen.append(k)
  assert sorted(seen) == list(range(200))

  bad = latent.copy_and_resolve_references()
  bad.channels = 16
  with pytest.raises(ValueError, match=r"\[8, 8, 32\].*data\.channels=16"):
    D.make_train_iterator(bad, global_batch_size=50, seed=0)


def _command(out, *extra):
  return [
    sys.executable,
    "-m",
    "dfm_jax.encode",
    "--config=configs/default.py",
    f"--out={out}",
    "--config.data.channels=3",
    "--config.data.resolution=32",
    "--config.autoencoder.kind=taef2",
    f"--config.autoencoder.weights={TAEF2}",
    "--config.autoencoder.batch_size=8",
    "--num_examples=160",
    "--shard_size=16",
    *extra,
  ]


def _env():
  e = dict(os.environ)
  e.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return e


def _run(cmd):
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  proc = _run(_command(straight, "--flip"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "encoding: 320/320 (100%)" in proc.stderr and "img/s" in proc.stderr

  killed = subprocess.Popen(
    _command(resumed, "--flip"),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while time.time() < deadline and killed.poll() is None:
    if len(LS.completed_shards(resumed, 20)) >= 3:
      break
    time.sleep(0.005)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  done = LS.completed_shards(resumed, 20)
  assert 3 <= len(done) < 20 and not os.path.exists(os.path.join(resumed, LS.METADATA))

  proc = _run(_command(resumed, "--flip"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resuming: {len(done)} of 20 shards already complete" in proc.stderr
  assert read_dir(resumed) == read_dir(straight)


@pytest.mark.integration
def test_bad_input_is_one_error_line(tmp_path):
  cmd = _command(str(tmp_path / "o"), "--config.data.source=latents")
  proc = _run(cmd)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "holds no pixels" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  proc = _run(cmd + ["--debug"])
  assert proc.returncode != 0 and "Traceback" in proc.stderr
