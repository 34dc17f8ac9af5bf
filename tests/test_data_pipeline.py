"""make_train_iterator: batch contract, flips, checkpoint/resume and the multi-host invariant."""

import json

import grain
import numpy as np
import pytest
from PIL import Image

from dfm_jax import data as D


def cfg(**overrides):
  c = D.default_data_config()
  c.update(overrides)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_have_the_contracted_shapes_dtypes_and_range():
  it = D.make_train_iterator(cfg(), global_batch_size=16, seed=0)
  for batch in take(it, 3):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["image"].min() == -1.0 and batch["image"].max() <= 1.0
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    np.testing.assert_array_equal(batch["image"][:, :2], -1.0)  # black padding


def test_epochs_cover_the_data_once_and_are_reshuffled(tmp_path):
  images = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1).repeat(2, 1).repeat(2, 2)
  np.savez(
    str(tmp_path / "lat.npz"), latents=images.astype(np.float32), labels=np.zeros(12, np.int64)
  )
  c = cfg(source="latents", path=str(tmp_path / "lat.npz"))
  ids = np.concatenate(
    [b["image"][:, 0, 0, 0] for b in take(D.make_train_iterator(c, global_batch_size=4, seed=0), 6)]
  )
  first, second = ids[:12], ids[12:]
  assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
  assert not np.array_equal(first, second)


def _write_uint8_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
  path.write_bytes(header + array.astype(np.uint8).tobytes())


def _asymmetric_idx(tmp_path, n=64):
  rng = np.random.default_rng(7)
  _write_uint8_idx(tmp_path / "t-images-idx3-ubyte", rng.integers(0, 256, (n, 8, 8)))
  _write_uint8_idx(tmp_path / "t-labels-idx1-ubyte", np.arange(n) % 10)
  return str(tmp_path / "t-images-idx3-ubyte")


def test_random_flip_mirrors_about_half_deterministically(tmp_path):
  path = _asymmetric_idx(tmp_path)
  plain = cfg(source="idx", path=path, resolution=8)
  flip = cfg(source="idx", path=path, resolution=8, random_flip=True)
  batches = 16
  ref = np.concatenate(
    [b["image"] for b in take(D.make_train_iterator(plain, global_batch_size=16, seed=3), batches)]
  )
  got = np.concatenate(
    [b["image"] for b in take(D.make_train_iterator(flip, global_batch_size=16, seed=3), batches)]
  )
  again = np.concatenate(
    [b["image"] for b in take(D.make_train_iterator(flip, global_batch_size=16, seed=3), batches)]
  )
  other = np.concatenate(
    [b["image"] for b in take(D.make_train_iterator(flip, global_batch_size=16, seed=4), batches)]
  )
  np.testing.assert_array_equal(got, again)
  same = np.array([np.array_equal(g, r) for g, r in zip(got, ref)])
  mirrored = np.array([np.array_equal(g, r[:, ::-1]) for g, r in zip(got, ref)])
  assert (same ^ mirrored).all()  # every image is either kept or mirrored, never both
  # 256 fair coin flips: the mirrored share lies in [0.35, 0.65] with probability > 1 - 1e-6.
  assert 0.35 < mirrored.mean() < 0.65
  assert not np.array_equal(got, other)


def test_resume_from_state_replays_exactly_the_next_batches():
  c = cfg(random_flip=True)
  it = D.make_train_iterator(c, global_batch_size=4, seed=11)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # Orbax stores the state as JSON
  expected = take(it, 4)
  fresh = D.make_train_iterator(c, global_batch_size=4, seed=11)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)


def test_orbax_saves_and_restores_the_iterator(tmp_path):
  import orbax.checkpoint as ocp

  c = cfg()
  it = D.make_train_iterator(c, global_batch_size=4, seed=2)
  take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 2)
    fresh = D.make_train_iterator(c, global_batch_size=4, seed=2)
    manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(fresh, 2), expected)


def _local_batches(c, global_batch, n, process_index, process_count=2):
  it = D.make_train_iterator(
    c,
    global_batch_size=global_batch,
    seed=5,
    process_index=process_index,
    process_count=process_count,
  )
  return take(it, n)


def _assert_rows_match(global_batches, local_batches, process_index, rows_per_process):
  rows = slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)
  for g, local in zip(global_batches, local_batches, strict=True):
    np.testing.assert_array_equal(local["image"], g["image"][rows])
    np.testing.assert_array_equal(local["label"], g["label"][rows])


def test_two_processes_see_row_blocks_of_the_global_batch():
  c = cfg(random_flip=True)
  global_batches = _local_batches(c, 6, 4, 0, process_count=1)
  for p in range(2):
    _assert_rows_match(global_batches, _local_batches(c, 6, 4, p), p, 3)


@pytest.mark.integration
def test_worker_processes_keep_the_row_blocks_and_resume(tmp_path):
  # Spawned workers take seconds to start, so this one test covers mp_prefetch: process 1
  # of 2 with two workers against the in-process global batches, then a restore.
  rng = np.random.default_rng(8)
  for k in range(10):
    (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(
      tmp_path / f"c{k % 2}" / f"{k}.png"
    )
  c = cfg(
    source="folder",
    path=str(tmp_path),
    resolution=8,
    channels=3,
    crop="center",
    random_flip=True,
    num_classes=2,
  )
  global_batches = _local_batches(c, 4, 3, 0, process_count=1)
  workers = cfg(**{**c.to_dict(), "num_workers": 2})
  it = D.make_train_iterator(workers, global_batch_size=4, seed=5, process_index=1, process_count=2)
  local = take(it, 2)
  state = it.get_state()
  local += take(it, 1)
  it.close()
  _assert_rows_match(global_batches, local, 1, 2)
  fresh = D.make_train_iterator(
    workers, global_batch_size=4, seed=5, process_index=1, process_count=2
  )
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 1), local[2:])
  fresh.close()
