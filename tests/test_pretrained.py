"""The Python entry for trained models (`dfm_jax.pretrained`): a run trained by the CLI, loaded,
sampled, published and loaded back (from a folder and from a Hub cache), against the samples
``--mode=sample`` writes."""

import json
import os
import shutil

import numpy as np
import pytest

from dfm_jax.pretrained import Generator
from tests.train_utils import run_main


COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  run_main(workdir, "--config.total_steps=4")
  run_main(workdir, "--mode=sample", "--config.sampler.num_samples=6")
  return workdir


@pytest.mark.integration
def test_samples_match_sample_mode_and_repeat_with_the_seed(trained):
  gen = Generator.load(trained)
  assert gen.step == 4
  config = gen.config
  saved = np.load(os.path.join(trained, "samples", "final_step4.npz"))
  out = gen.sample(num=6, seed=config.seed + 1, batch_size=config.sampler.batch_size)
  np.testing.assert_array_equal(out.images, saved["images"])
  np.testing.assert_array_equal(out.labels, saved["labels"])
  assert out.images.dtype == np.uint8 and out.images.shape == (6, 32, 32, 1)
  stages = config.decomposition.num_stages
  assert out.previews.shape == (stages, 6, 32, 32, 1)
  np.testing.assert_array_equal(out.previews[-1], out.images)  # the last stage is the sample
  again = gen.sample(labels=[3, 1], seed=5, previews=False)
  np.testing.assert_array_equal(again.data, gen.sample(labels=[3, 1], seed=5).data)
  assert again.previews is None and list(again.labels) == [3, 1]
  other = gen.sample(labels=[3, 1], seed=5, steps_per_stage=(3, 2, 2), cfg_scale=1.0)
  assert not np.array_equal(other.data, again.data)
  with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
    gen.sample(labels=[10])


@pytest.mark.integration
def test_published_model_loads_back_from_a_folder_and_the_hub(trained, tmp_path, monkeypatch):
  gen = Generator.load(trained)
  folder = gen.publish(str(tmp_path / "published"))
  assert sorted(os.listdir(folder)) == ["README.md", "config.json", "weights.safetensors"]
  card = open(os.path.join(folder, "README.md")).read()
  assert "Published from training step 4" in card and "model.hidden_size = 32" in card
  want = gen.sample(labels=[0, 5, 9], seed=2).data
  back = Generator.load(folder)
  assert back.step == 4
  np.testing.assert_array_equal(back.sample(labels=[0, 5, 9], seed=2).data, want)

  # The Hub: a cache laid out as huggingface_hub writes it, read offline at a pinned revision.
  monkeypatch.setenv("DFM_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  repo = tmp_path / "cache" / "hub" / "models--someone--dfm-digits"
  shutil.copytree(folder, repo / "snapshots" / COMMIT)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(COMMIT)
  hub = Generator.load(f"hf://someone/dfm-digits@{COMMIT}")
  np.testing.assert_array_equal(hub.sample(labels=[0, 5, 9], seed=2).data, want)


@pytest.mark.integration
def test_weights_that_do_not_fit_the_config_are_refused(trained, tmp_path):
  folder = Generator.load(trained).publish(str(tmp_path / "published"))
  config = json.load(open(os.path.join(folder, "config.json")))
  config["model"]["hidden_size"] = 64
  json.dump(config, open(os.path.join(folder, "config.json"), "w"))
  with pytest.raises(ValueError, match="weights.safetensors: .* has shape"):
    Generator.load(folder)
  with pytest.raises(FileNotFoundError, match="not a run's workdir or a published model"):
    Generator.load(str(tmp_path))


def test_shipped_digits_model_draws_the_digits_asked_for():
  """The model in the package (configs/default.py, 2,000 steps): 30 samples, three per class,
  classified by their nearest class-mean image of the real digits (right on 89% of the real
  digits; 30 of 30 samples here) are mostly the digits asked for."""
  from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  gen = Generator.load("digits")
  out = gen.sample(num=30, seed=0)
  images, labels = data_lib.load_mnist5k()
  means = np.stack([images[labels == k].mean(axis=0) for k in range(10)]).reshape(10, -1)
  samples = out.images[:, 2:30, 2:30, 0].reshape(30, -1).astype(np.float32)  # unpad 32 -> 28
  guess = np.argmin(((samples[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (guess == out.labels).mean() >= 0.7


@pytest.mark.integration
def test_push_to_hub_returns_a_pinned_name_that_loads(trained, tmp_path, monkeypatch):
  """The Hub is replaced by a stand-in that stores the uploaded folder in the local Hub cache
  at a new commit, as a download at that revision would: the returned name loads back."""
  import types  # pylint: disable=g-import-not-at-top

  import huggingface_hub  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv("DFM_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  calls = []

  def create_repo(self, repo_id, **kwargs):
    calls.append(("create", repo_id, kwargs))

  def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
    calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), commit_message))
    repo = tmp_path / "cache" / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder_path, repo / "snapshots" / COMMIT)
    return types.SimpleNamespace(oid=COMMIT)

  monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
  monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
  gen = Generator.load(trained)
  name = gen.push_to_hub("someone/digits-run")
  assert name == f"hf://someone/digits-run@{COMMIT}"
  assert calls[0][:2] == ("create", "someone/digits-run")
  assert calls[1][2] == ["README.md", "config.json", "weights.safetensors"]
  assert calls[1][3] == "dfm_jax model, training step 4"
  want = gen.sample(labels=[2, 7], seed=3).data
  np.testing.assert_array_equal(Generator.load(name).sample(labels=[2, 7], seed=3).data, want)
