"""A ``gs://`` workdir and ``gs://`` latent shards, against a local GCS emulator.

The fixture starts ``gcp-storage-emulator`` in this process (a thread on 127.0.0.1, a free port)
and points every client at it through the environment, which the CLI runs inherit:

* ``STORAGE_EMULATOR_HOST``: gcsfs (etils.epath's fsspec backend: config.json, samples, eval
  JSON, stage statistics, the workdir lock, Orbax's directory work, grain's iterator state) and
  google-cloud-storage (tensorboardX's gs:// event writer, Orbax's bucket look-ups);
* ``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: TensorStore's ``gcs``
  kvstore (the checkpoint arrays), which otherwise talks to storage.googleapis.com with Google
  credentials;
* ``CLOUD_STORAGE_EMULATOR_ENDPOINT``: google-cloud-cpp inside ``array_record`` (reading shards).

The jax profiler's own GCS client (TSL's, compiled into jaxlib) has its endpoint fixed to
www.googleapis.com and cannot be pointed at an emulator; ``train.py`` therefore writes a trace
to a local folder and copies it into ``workdir/profile`` through epath, which is tested here.
"""

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.train_utils import REPO, env, main_command, read_checkpoint, run_main, tiny_flags

pytestmark = pytest.mark.integration

BUCKET = "bucket"
FLAGS = tiny_flags(total_steps=6, checkpoint_every=2, sample_every=2, profile_steps=(3, 4))


def _patch_emulator(server_module, objects) -> None:
  """Two things real GCS does and the emulator does not, which the clients rely on:

  * downloads carry ``x-goog-generation`` (TensorStore reads an object's generation from it and
    makes its conditional writes -- OCDBT's manifest updates -- on it);
  * ``objects.moveTo`` (gcsfs renames with it, retrying a 501 several times before copying):
    answered as copy + delete.
  """
  if getattr(server_module, "_dfm_patched", False):
    return
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status < 300:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", 1))

  def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status < 300:
      storage.delete_file(request.params["bucket_name"], request.params["object_id"])

  objects.download = download  # objects.get (alt=media) calls it by name
  handlers = [
    (regex, {m: download if f is original else f for m, f in methods.items()})
    for regex, methods in server_module.HANDLERS
  ]
  move_to = (
    r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
    r"(?P<dest_object_id>.*[^/]+)$"
  )
  server_module.HANDLERS = ((move_to, {"POST": move}), *handlers)
  server_module._dfm_patched = True


@pytest.fixture(scope="module")
def gcs():
  """Starts the emulator with bucket ``bucket``; sets the clients' environment; yields the URL."""
  import logging  # pylint: disable=g-import-not-at-top

  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  _patch_emulator(server, objects)
  emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
  emulator.start()
  port = emulator._api._httpd.server_address[1]  # pylint: disable=protected-access
  url = f"http://127.0.0.1:{port}"
  settings = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
    "GOOGLE_CLOUD_PROJECT": "emulator",
    "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential search
    # gcsfs's default file system asks the Storage Control gRPC API for the bucket type.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  saved = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  _fresh_gcsfs()
  try:
    yield url
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _fresh_gcsfs()
    emulator.stop()


def _fresh_gcsfs() -> None:
  """Makes epath in this process build its gcsfs file system from the current environment."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs.core  # pylint: disable=g-import-not-at-top
  from etils.epath import backend  # pylint: disable=g-import-not-at-top

  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _path(*parts):
  from etils import epath  # pylint: disable=g-import-not-at-top

  return epath.Path(f"gs://{BUCKET}").joinpath(*parts)


def _names(folder) -> list[str]:
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _files(folder) -> list[str]:
  """Paths under ``folder`` relative to it (epath's rglob refuses ``**`` on gs://)."""
  if not folder.exists():
    return []
  out = []
  for p in folder.iterdir():
    out += [f"{p.name}/{n}" for n in _files(p)] if p.is_dir() else [p.name]
  return out


def _download(src, dst: str) -> None:
  """Copies the tree at ``src`` (epath) into the local folder ``dst``."""
  os.makedirs(dst, exist_ok=True)
  for p in src.iterdir():
    if p.is_dir():
      _download(p, os.path.join(dst, p.name))
    else:
      with open(os.path.join(dst, p.name), "wb") as f:
        f.write(p.read_bytes())


def test_gs_workdir_killed_and_resumed_matches_a_local_run(gcs, tmp_path):
  del gcs
  local = str(tmp_path / "local")
  run_main(local, *FLAGS)

  workdir = f"gs://{BUCKET}/run"
  commit = _path("run", "checkpoints", "2", "commit_success.txt")
  with open(tmp_path / "first.err", "w") as err:
    first = subprocess.Popen(
      main_command(workdir, *FLAGS), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=err
    )
    deadline = time.time() + 600
    while not commit.exists() and first.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  assert first.returncode == -signal.SIGKILL, (tmp_path / "first.err").read_text()[-3000:]
  assert commit.exists(), (tmp_path / "first.err").read_text()[-3000:]

  second = run_main(workdir, *FLAGS)
  resumed = re.search(r"resuming from checkpoint at step (\d+)", second.stderr)
  assert resumed and int(resumed.group(1)) >= 2, second.stderr[-3000:]
  assert "took over the stale workdir lock" in second.stderr, second.stderr[-3000:]

  # The final state equals the uninterrupted local run's, array for array.
  run = _path("run")
  steps = sorted(int(n) for n in _names(run / "checkpoints") if n.isdigit())
  assert steps[-1] == 6, steps
  copy = str(tmp_path / "copy")
  _download(run / "checkpoints" / "6", os.path.join(copy, "checkpoints", "6"))
  got, want = read_checkpoint(copy, 6), read_checkpoint(local, 6)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  # Everything else a run writes is in the bucket, and the lock is gone.
  names = _names(run)
  assert "config.json" in names and ".lock" not in names, names
  assert "step_0000006.png" in _names(run / "samples")
  assert any(n.startswith("events.out.tfevents") for n in _names(run / "tensorboard"))
  traces = [n for n in _files(run / "profile") if n.endswith(".xplane.pb")]
  assert traces, _files(run / "profile")


def test_latent_shards_on_gs_feed_the_train_iterator(gcs):
  del gcs
  from dfm_jax import data as D  # pylint: disable=g-import-not-at-top
  from dfm_jax.data import latent_shards as LS  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  latents = rng.normal(size=(12, 2, 2, 5)).astype(np.float32)
  labels = (np.arange(12) % 7).astype(np.int32)
  out = f"gs://{BUCKET}/latents"
  plan = {
    "count": 12,
    "source_examples": 12,
    "flip": False,
    "shard_size": 5,
    "num_shards": 3,
    "latent_shape": [2, 2, 5],
    "autoencoder": {"kind": "test"},
    "source": {"source": "synthetic"},
  }
  LS.start(out, plan)
  for s in range(3):
    LS.write_shard(out, s, 3, latents[5 * s : 5 * s + 5], labels[5 * s : 5 * s + 5])
  meta = LS.finalize(out, plan)
  assert [s["records"] for s in meta["shards"]] == [5, 5, 2]
  assert LS.latent_shape(out) == (2, 2, 5)

  c = D.default_data_config()
  c.update(dict(source="latents", path=out, resolution=2, channels=5, num_classes=7))
  batch = next(D.make_train_iterator(c, global_batch_size=12, seed=0))
  assert batch["image"].shape == (12, 2, 2, 5)
  stored = latents.astype(np.float16).astype(np.float32)
  order = np.argsort(batch["image"][:, 0, 0, 0])
  expected = np.argsort(stored[:, 0, 0, 0])
  np.testing.assert_array_equal(batch["image"][order], stored[expected])
  np.testing.assert_array_equal(batch["label"][order], labels[expected])


def test_autoencoder_weights_from_gs_are_fetched_once(gcs, tmp_path, monkeypatch):
  from dfm_jax import autoencoders, storage  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv("DFM_JAX_CACHE", str(tmp_path / "cache"))
  remote = _path("weights", "taef2")
  storage.copy_tree(autoencoders.shipped_weights("taef2"), remote)
  config = {"kind": "taef2", "weights": str(remote)}
  ae = autoencoders.from_config(config)
  ref = autoencoders.from_config({"kind": "taef2", "weights": ""})
  z = np.random.default_rng(0).normal(size=(1, 2, 2, 32)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ae.decode(z)), np.asarray(ref.decode(z)))
  remote.rmtree()  # the second use reads the cached copy
  assert autoencoders.from_config(config).latent_channels == 32
  (cached,) = (tmp_path / "cache" / "weights").iterdir()
  assert set(autoencoders.SHIPPED["taef2"]) <= set(os.listdir(cached / "taef2"))
