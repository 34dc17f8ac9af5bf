"""Latent shard sets: record layout, writer/reader round trip, statistics, resume markers, and
the `latents` source reading a shard folder (and still an .npz) with config checks."""

import json
import os

import numpy as np
import pytest

from dfm_jax import data as D
from dfm_jax.data import latent_shards as LS


def cfg(**overrides):
  c = D.default_data_config()
  c.update(overrides)
  return c


def write_set(out, latents, labels, shard_size, plan_extra=None):
  """Writes latents [N, h, w, c] and labels [N] as a shard set the way `encode` does."""
  n = len(latents)
  num_shards = -(-n // shard_size)
  plan = {
    "count": n,
    "source_examples": n,
    "flip": False,
    "shard_size": shard_size,
    "num_shards": num_shards,
    "latent_shape": list(latents.shape[1:]),
    "autoencoder": {"kind": "test"},
    "source": {"source": "synthetic"},
    **(plan_extra or {}),
  }
  LS.start(out, plan)
  for s in range(num_shards):
    sl = slice(s * shard_size, min(n, (s + 1) * shard_size))
    LS.write_shard(out, s, num_shards, latents[sl], labels[sl])
  return LS.finalize(out, plan), plan


@pytest.fixture
def synthetic(tmp_path):
  rng = np.random.default_rng(0)
  latents = (rng.normal(size=(23, 2, 3, 5)) * [1, 2, 3, 0.5, 4] + [0, 1, -1, 2, 0]).astype(
    np.float32
  )
  labels = rng.integers(0, 7, size=23).astype(np.int32)
  out = str(tmp_path / "set")
  meta, plan = write_set(out, latents, labels, shard_size=10)
  return out, latents, labels, meta, plan


def test_record_layout_is_label_then_float16_latents():
  latent = np.arange(12, dtype=np.float32).reshape(2, 3, 2) / 4
  raw = LS.pack_record(latent, 7)
  assert len(raw) == 4 + 2 * 12
  assert raw[:4] == (7).to_bytes(4, "little")
  np.testing.assert_array_equal(np.frombuffer(raw[4:], "<f2").reshape(2, 3, 2), latent)
  back, label = LS.unpack_record(raw, (2, 3, 2))
  assert label == 7 and label.dtype == np.int32
  np.testing.assert_array_equal(back, latent)
  with pytest.raises(ValueError, match="expected 28"):
    LS.unpack_record(raw[:-2], (2, 3, 2))


def test_round_trip_metadata_and_stats(synthetic):
  out, latents, labels, meta, _ = synthetic
  stored = latents.astype(np.float16)
  assert meta["count"] == 23 and meta["latent_shape"] == [2, 3, 5] and meta["dtype"] == "float16"
  assert [s["records"] for s in meta["shards"]] == [10, 10, 3]
  assert [s["name"] for s in meta["shards"]] == [LS.shard_name(i, 3) for i in range(3)]
  for s in meta["shards"]:
    assert LS._sha256(os.path.join(out, s["name"])) == s["sha256"]
  assert meta["label_range"] == [int(labels.min()), int(labels.max())]
  x = stored.astype(np.float64)
  np.testing.assert_allclose(meta["channel_mean"], x.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(meta["channel_std"], x.std(axis=(0, 1, 2)), rtol=1e-12)

  source = LS.LatentShards(out)
  assert len(source) == 23
  for i in (0, 9, 10, 22):
    e = source[i]
    assert e["image"].dtype == np.float32 and e["image"].shape == (2, 3, 5)
    np.testing.assert_array_equal(e["image"], stored[i])
    assert e["label"] == labels[i] and e["label"].dtype == np.int32
  many = source.__getitems__([22, 3, 10])
  np.testing.assert_array_equal(np.stack([m["image"] for m in many]), stored[[22, 3, 10]])
  all_latents, all_labels = source.arrays()
  np.testing.assert_array_equal(all_latents, stored)
  np.testing.assert_array_equal(all_labels, labels)
  with pytest.raises(IndexError):
    source[23]


def test_train_iterator_reads_a_shard_folder(synthetic):
  out, latents, labels, _, _ = synthetic
  c = cfg(source="latents", path=out, resolution=2, channels=5, num_classes=7, latent_scale=0.5)
  with pytest.raises(ValueError, match=r"data\.path: latent shards .* \[2, 3, 5\]"):
    D.make_train_iterator(c, global_batch_size=23, seed=0)  # h != w: never matches

  square = (np.random.default_rng(1).normal(size=(12, 2, 2, 5))).astype(np.float32)
  square_labels = np.arange(12, dtype=np.int32) % 7
  path = os.path.join(os.path.dirname(out), "square")
  write_set(path, square, square_labels, shard_size=5)
  c.path = path
  it = D.make_train_iterator(c, global_batch_size=12, seed=0)
  batch = next(it)
  assert batch["image"].shape == (12, 2, 2, 5) and batch["image"].dtype == np.float32
  order = np.argsort([float(b[0, 0, 0]) for b in batch["image"]])
  expected = np.argsort(square[:, 0, 0, 0].astype(np.float16).astype(np.float32) * 0.5)
  np.testing.assert_array_equal(
    batch["image"][order], square[expected].astype(np.float16).astype(np.float32) * 0.5
  )
  np.testing.assert_array_equal(batch["label"][order], square_labels[expected])
  assert D.dataset_size(c) == 12


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(resolution=4), r"data\.path: .*\[2, 2, 5\].*data\.resolution=4"),
    (dict(channels=4), r"data\.path: .*\[2, 2, 5\].*data\.channels=4"),
    (dict(num_classes=3), r"data\.path: labels .* span 0\.\.6, outside \[0, 3\)"),
  ],
)
def test_mismatched_config_is_one_clear_error(tmp_path, overrides, message):
  path = str(tmp_path / "set")
  write_set(path, np.zeros((8, 2, 2, 5), np.float32), np.arange(8, dtype=np.int32) % 7, 4)
  c = cfg(source="latents", path=path, resolution=2, channels=5, num_classes=7)
  D.validate_data_config(c)
  c.update(overrides)
  with pytest.raises(ValueError, match=message):
    D.validate_data_config(c)


def test_folder_without_metadata_or_with_missing_shards(tmp_path):
  path = str(tmp_path / "set")
  meta, _ = write_set(path, np.zeros((8, 2, 2, 5), np.float32), np.zeros(8, np.int32), 4)
  c = cfg(source="latents", path=path, resolution=2, channels=5)
  os.remove(os.path.join(path, meta["shards"][1]["name"]))
  with pytest.raises(ValueError, match=r"data\.path: .* lacks 1 shard file"):
    D.validate_data_config(c)
  os.remove(os.path.join(path, LS.METADATA))
  with pytest.raises(
    ValueError,
    match=r"data\.path: .* neither an \.npz file nor a latent "
    r"shard folder",
  ):
    D.validate_data_config(c)
  c.path = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match=r"data\.path: .*nothing.* neither"):
    D.validate_data_config(c)


def test_npz_path_still_works(tmp_path):
  path = str(tmp_path / "lat.npz")
  np.savez(path, latents=np.ones((4, 2, 2, 3), np.float16), labels=np.arange(4))
  source = D.open_source(cfg(source="latents", path=path))
  assert len(source) == 4 and source[2]["image"].dtype == np.float32
  assert LS.latent_shape(path) == (2, 2, 3)


def test_resume_markers_partial_files_and_plan_check(tmp_path):
  out = str(tmp_path / "set")
  latents = np.random.default_rng(2).normal(size=(9, 2, 2, 3)).astype(np.float32)
  labels = np.zeros(9, np.int32)
  meta, plan = write_set(out, latents, labels, shard_size=4)
  assert LS.latent_shape(out) == (2, 2, 3)
  assert sorted(LS.completed_shards(out, 3)) == [0, 1, 2]
  # A truncated shard (size differs from its marker) and a missing marker are not complete.
  name1 = os.path.join(out, meta["shards"][1]["name"])
  with open(name1, "r+b") as f:
    f.truncate(100)
  os.remove(os.path.join(out, LS.PROGRESS_DIR, "shard-00002-of-00003.json"))
  assert sorted(LS.completed_shards(out, 3)) == [0]
  with pytest.raises(ValueError, match=r"shard\(s\) \[1, 2\] of 3 are not complete"):
    LS.finalize(out, plan)
  LS.start(out, plan)  # same plan: fine
  with pytest.raises(ValueError, match="other settings.*shard_size"):
    LS.start(out, {**plan, "shard_size": 5})
  with open(os.path.join(out, LS.METADATA)) as f:
    assert json.load(f)["count"] == 9


def test_overflowing_latents_are_refused(tmp_path):
  out = str(tmp_path / "set")
  LS.start(out, {"num_shards": 1})
  with pytest.raises(ValueError, match="overflow float16"):
    LS.write_shard(out, 0, 1, np.full((2, 1, 1, 1), 1e6, np.float32), np.zeros(2, np.int32))


def test_truncated_and_damaged_shards_are_named_or_skipped(tmp_path):
  """A truncated shard is refused with the config (its size against metadata.json); a shard
  damaged in place names its file and record when read, and under data.skip_corrupt its
  records are replaced by the next readable ones."""
  path = str(tmp_path / "set")
  latents = np.arange(12 * 2 * 2 * 5, dtype=np.float32).reshape(12, 2, 2, 5)
  meta, _ = write_set(path, latents, np.arange(12, dtype=np.int32) % 7, 4)
  c = cfg(source="latents", path=path, resolution=2, channels=5, num_classes=7)
  second = os.path.join(path, meta["shards"][1]["name"])
  original = open(second, "rb").read()
  with open(second, "wb") as f:
    f.write(original[: len(original) // 2])
  with pytest.raises(ValueError, match=r"data\.path: shard .*00001-of-00003.* is \d+ bytes"):
    D.validate_data_config(c)
  with open(second, "wb") as f:  # same size, every byte after the header flipped
    f.write(original[:8] + bytes(b ^ 0xFF for b in original[8:]))
  D.validate_data_config(c)  # a same-size change is found when read
  source = D.open_source(c)
  np.testing.assert_array_equal(source[1]["image"], latents[1])  # other shards read fine
  with pytest.raises(D.CorruptRecordError, match=r"00001-of-00003\.array_record record 0"):
    source[4]
  c.skip_corrupt = True
  skipping = D.open_source(c)
  np.testing.assert_array_equal(skipping[4]["image"], latents[8])  # shard 2's first record
  items = skipping.__getitems__([0, 5, 9])
  np.testing.assert_array_equal(np.stack([e["image"] for e in items]), latents[[0, 8, 9]])
