"""Weights from where users keep them (`storage.local_copy`): a local path, the Hugging Face Hub at
a pinned revision (here from a Hub cache laid out as huggingface_hub writes it, offline), and the
tree copy behind ``gs://`` (tests/test_gcs.py fetches through a GCS emulator)."""

import os
import shutil

import numpy as np
import pytest

from dfm_jax import autoencoders, storage

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("DFM_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the Hub cache only
  return tmp_path / "cache"


def _hub_snapshot(cache, repo_id: str, files: dict[str, str]) -> None:
  """A Hub cache entry for ``repo_id`` at ``COMMIT``, as huggingface_hub lays it out."""
  repo = cache / "hub" / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / COMMIT
  snapshot.mkdir(parents=True)
  for name, source in files.items():
    shutil.copy(source, snapshot / name)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(COMMIT)


def test_local_paths_and_empty_pass_through(cache):
  assert storage.local_copy("", "autoencoder.weights") == ""
  assert storage.local_copy("/data/ae.safetensors", "x") == "/data/ae.safetensors"
  assert not cache.exists()


def test_hub_weights_at_a_pinned_revision_load_like_the_shipped_ones(cache):
  shipped = autoencoders.shipped_weights("taef2")
  files = {n: os.path.join(shipped, n) for n in autoencoders.SHIPPED["taef2"]}
  _hub_snapshot(cache, "someone/taef2", files)
  folder = storage.local_copy(f"hf://someone/taef2@{COMMIT}", "autoencoder.weights")
  assert sorted(os.listdir(folder)) == sorted(files)
  one = storage.local_copy(f"hf://someone/taef2@{COMMIT}/taef2_decoder.pth", "f")
  assert open(one, "rb").read() == open(files["taef2_decoder.pth"], "rb").read()
  hub = autoencoders.from_config({"kind": "taef2", "weights": f"hf://someone/taef2@{COMMIT}"})
  ref = autoencoders.from_config({"kind": "taef2", "weights": ""})
  z = np.random.default_rng(0).normal(size=(1, 2, 2, 32)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(hub.decode(z)), np.asarray(ref.decode(z)))


@pytest.mark.parametrize(
  "spec", ["hf://someone/taef2/taef2_decoder.pth", "hf://taef2@main", "hf://@v1/x"]
)
def test_hub_spec_without_a_pinned_revision_is_refused(cache, spec):
  with pytest.raises(ValueError, match=r"eval.i3d_weights: .* pin a revision"):
    storage.local_copy(spec, "eval.i3d_weights")


def test_hub_weights_not_reachable_name_the_field(cache):
  with pytest.raises(FileNotFoundError, match="autoencoder.weights: cannot fetch hf://a/b@v1/w"):
    storage.local_copy("hf://a/b@v1/w.pth", "autoencoder.weights")


def test_copy_tree_copies_files_and_folders(tmp_path):
  src = tmp_path / "src"
  (src / "a" / "b").mkdir(parents=True)
  (src / "top.txt").write_text("1")
  (src / "a" / "b" / "deep.bin").write_bytes(b"\x00\x01")
  storage.copy_tree(src, tmp_path / "dst")
  assert (tmp_path / "dst" / "a" / "b" / "deep.bin").read_bytes() == b"\x00\x01"
  storage.copy_tree(src / "top.txt", tmp_path / "one" / "top.txt")
  assert (tmp_path / "one" / "top.txt").read_text() == "1"
