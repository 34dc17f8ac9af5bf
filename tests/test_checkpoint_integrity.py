"""Checkpoint integrity: damaged steps are quarantined and the newest intact one restored; failed
asynchronous saves surface as ``CheckpointSaveError``; checksums ignore the sharding."""

import errno
import glob
import json
import logging
import os
import shutil
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dfm_jax import checkpoint, checksums
from dfm_jax.checkpoint import (
  Checkpointer,
  CheckpointCorruptError,
  CheckpointMismatchError,
  CheckpointSaveError,
)


def sharding():
  mesh = jax.make_mesh((8,), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))


def make_state(value: int) -> nnx.State:
  """A few arrays, one sharded over 8 devices: ``w`` float32 [64, 32], ``b`` bf16 [5],
  ``count`` int32 [], ``key`` a PRNG key."""
  w = jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) * 0.5 + value
  return nnx.State(
    {
      "w": jax.device_put(w, sharding()),
      "sub": {"b": jnp.full((5,), value, jnp.bfloat16), "count": jnp.int32(value)},
      "key": jax.random.key(value),
    }
  )


def abstract_state() -> nnx.State:
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), make_state(0)
  )


def make_iter():
  """A grain iterator over 0, 1, 2, ..."""
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def assert_state_equal(got: nnx.State, value: int):
  want = make_state(value)
  np.testing.assert_array_equal(np.asarray(got["w"][...]), np.asarray(want["w"][...]))
  np.testing.assert_array_equal(
    np.asarray(got["sub"]["b"][...], np.float32), np.asarray(want["sub"]["b"][...], np.float32)
  )
  assert int(got["sub"]["count"][...]) == value
  np.testing.assert_array_equal(
    jax.random.key_data(got["key"][...]), jax.random.key_data(want["key"][...])
  )


@pytest.fixture
def two_steps(tmp_path):
  """Steps 1 and 2 saved asynchronously; the iterator had yielded 1 and 2 elements."""
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory)
  it = make_iter()
  for step in (1, 2):
    next(it)
    ckpt.save(step, make_state(step), it)
  ckpt.close()
  return directory


def _data_files(step_dir: str) -> list[str]:
  """The OCDBT data files (the merged database's and the per-process ones)."""
  return glob.glob(os.path.join(step_dir, "state", "d", "*")) + glob.glob(
    os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")
  )


def _largest_data_file(step_dir: str) -> str:
  return max(_data_files(step_dir), key=os.path.getsize)


def flip_bytes(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


def truncate_file(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def delete_tree_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def delete_data_files(step_dir):
  """Missing chunks read back as zeros if nothing checks them."""
  for path in _data_files(step_dir):
    os.remove(path)


def state_of_another_step(step_dir):
  """Valid Orbax data that decodes silently to other values: only the checksums can tell."""
  other = os.path.join(os.path.dirname(step_dir), "1", "state")
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(other, os.path.join(step_dir, "state"))


def garbage_iterator_state(step_dir):
  open(os.path.join(step_dir, "data_iter", "process_0-of-1.json"), "wb").write(os.urandom(64))


def plausible_iterator_state(step_dir):
  """Valid JSON that grain would accept: the position moved on by 100 elements."""
  path = os.path.join(step_dir, "data_iter", "process_0-of-1.json")
  text = open(path).read()
  state = json.loads(text)
  state["next_index"] = state["next_index"] + 100
  open(path, "w").write(json.dumps(state, indent=4))


def empty_manifest(step_dir):
  open(os.path.join(step_dir, "integrity", "metadata"), "w").close()


def delete_step_metadata(step_dir):
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))


# {case: (damage, reasons the quarantine folder may name)}. Which reason a damaged data file
# gives depends on what it held: array chunks or also the arrays' zarr metadata.
DAMAGE = {
  "flipped-bytes": (flip_bytes, {"checksum", "unreadable", "metadata"}),
  "truncated-file": (truncate_file, {"unreadable", "metadata"}),
  "deleted-tree-metadata": (delete_tree_metadata, {"metadata"}),
  "deleted-data-files": (delete_data_files, {"unreadable", "metadata"}),
  "state-of-another-step": (state_of_another_step, {"checksum"}),
  "garbage-iterator-state": (garbage_iterator_state, {"data-iter"}),
  "plausible-iterator-state": (plausible_iterator_state, {"data-iter"}),
  "empty-manifest": (empty_manifest, {"manifest"}),
  "deleted-step-metadata": (delete_step_metadata, {"metadata"}),
}


def test_round_trip_writes_a_manifest(two_steps):
  manifest = json.load(open(os.path.join(two_steps, "2", "integrity", "metadata")))
  assert manifest["format"] == checkpoint.MANIFEST_FORMAT
  assert set(manifest["arrays"]) == {"w", "sub/b", "sub/count", "key"}
  assert len(manifest["data_iter_sha256"]) == 1
  ckpt = Checkpointer(two_steps)
  it = make_iter()
  step, state = ckpt.restore_latest(abstract_state(), it)
  assert step == 2
  assert_state_equal(state, 2)
  assert next(it) == 2
  ckpt.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_step_is_quarantined_and_previous_restored(two_steps, damage, caplog):
  corrupt, reasons = DAMAGE[damage]
  corrupt(os.path.join(two_steps, "2"))
  ckpt = Checkpointer(two_steps)
  it = make_iter()
  with caplog.at_level(logging.WARNING, logger="dfm_jax.checkpoint"):
    step, state = ckpt.restore_latest(abstract_state(), it)
  assert step == 1
  assert_state_equal(state, 1)  # step 1's values, nothing of step 2
  assert next(it) == 1  # the iterator sits where step 1 left it
  (moved,) = os.listdir(os.path.join(two_steps, "quarantine"))
  assert moved.startswith("2-") and moved[2:] in reasons, moved
  quarantined = os.path.join(two_steps, "quarantine", moved)
  assert not os.path.exists(os.path.join(two_steps, "2"))
  assert ckpt.all_steps() == [1]
  lines = [r.getMessage() for r in caplog.records if r.name == "dfm_jax.checkpoint"]
  assert len(lines) == 1 and "\n" not in lines[0]
  assert "step 2" in lines[0] and quarantined in lines[0]
  # Training goes on: step 2 can be written again.
  ckpt.save(2, make_state(22), it)
  ckpt.close()
  assert Checkpointer(two_steps).restore(2, abstract_state())["sub"]["count"][...] == 22


def test_restore_of_a_damaged_step_raises_and_moves_nothing(two_steps):
  flip_bytes(os.path.join(two_steps, "2"))
  ckpt = Checkpointer(two_steps)
  it = make_iter()
  with pytest.raises(CheckpointCorruptError, match="step 2 is damaged"):
    ckpt.restore(2, abstract_state(), it)
  assert next(it) == 0  # the iterator was not moved
  assert os.path.isdir(os.path.join(two_steps, "2"))
  ckpt.close()


def test_every_step_damaged_gives_none(two_steps):
  for step in (1, 2):
    empty_manifest(os.path.join(two_steps, str(step)))
  ckpt = Checkpointer(two_steps)
  assert ckpt.restore_latest(abstract_state()) == (None, None)
  assert sorted(os.listdir(os.path.join(two_steps, "quarantine"))) == ["1-manifest", "2-manifest"]
  ckpt.close()


def test_out_of_memory_during_restore_is_not_damage(two_steps, monkeypatch):
  ckpt = Checkpointer(two_steps)

  def restore(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0GiB")

  monkeypatch.setattr(ckpt.manager, "restore", restore)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    ckpt.restore_latest(abstract_state())
  assert not os.path.exists(os.path.join(two_steps, "quarantine"))
  monkeypatch.undo()
  ckpt.close()


def test_model_mismatch_is_not_quarantined(two_steps):
  other = nnx.State({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  ckpt = Checkpointer(two_steps)
  with pytest.raises(CheckpointMismatchError, match="does not match the model"):
    ckpt.restore_latest(other)
  assert not os.path.exists(os.path.join(two_steps, "quarantine"))
  ckpt.close()


def test_restoring_into_another_dtype_verifies_then_casts(two_steps):
  wanted = abstract_state()
  wanted["w"] = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16, sharding=sharding())
  ckpt = Checkpointer(two_steps)
  step, state = ckpt.restore_latest(wanted)
  assert step == 2 and state["w"][...].dtype == jnp.bfloat16
  want = make_state(2)["w"][...].astype(jnp.bfloat16)
  np.testing.assert_array_equal(
    np.asarray(state["w"][...], np.float32), np.asarray(want, np.float32)
  )
  assert not os.path.exists(os.path.join(two_steps, "quarantine"))
  ckpt.close()


def test_checkpoint_without_checksums_restores_with_one_warning(tmp_path, caplog):
  directory = str(tmp_path / "old")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data_iter"))
  it = make_iter()
  next(it)
  manager.save(
    3,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(nnx.to_pure_dict(make_state(3))),
      data_iter=grain.checkpoint.CheckpointSave(it),
    ),
  )
  manager.close()
  ckpt = Checkpointer(directory)
  fresh = make_iter()
  with caplog.at_level(logging.WARNING, logger="dfm_jax.checkpoint"):
    step, state = ckpt.restore_latest(abstract_state(), fresh)
  assert step == 3
  assert_state_equal(state, 3)
  assert next(fresh) == 1
  warnings = [r.getMessage() for r in caplog.records if r.name == "dfm_jax.checkpoint"]
  assert len(warnings) == 1 and "no checksums" in warnings[0]
  ckpt.close()


def _fail_finalizing(monkeypatch, step: int):
  """Makes the background finalisation of ``step`` fail as on a full disk."""
  cls = ocp.path.atomicity.AtomicRenameTemporaryPath
  original = cls.finalize

  async def finalize(self, *args, **kwargs):
    if self._final_path.name == str(step):  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(cls, "finalize", finalize)


@pytest.mark.parametrize("surfaces_from", ["save", "wait", "close", "check"])
def test_failed_async_save_raises_once_and_keeps_last_good(tmp_path, monkeypatch, surfaces_from):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory)
  it = make_iter()
  ckpt.save(2, make_state(2), it)
  ckpt.wait()
  _fail_finalizing(monkeypatch, 3)
  ckpt.save(3, make_state(3), it)  # returns at once; the failure happens in the background
  with pytest.raises(CheckpointSaveError) as err:
    if surfaces_from == "save":
      ckpt.save(4, make_state(4), it)
    elif surfaces_from == "wait":
      ckpt.wait()
    elif surfaces_from == "close":
      ckpt.close()
    else:
      deadline = time.time() + 60
      while time.time() < deadline:
        ckpt.check()
        time.sleep(0.05)
  message = str(err.value)
  assert err.value.step == 3 and "\n" not in message
  assert "step 3" in message and "No space left on device" in message
  assert "newest complete checkpoint is step 2" in message
  ckpt.close()  # already reported: closes quietly
  monkeypatch.undo()
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["2"]
  step, state = Checkpointer(directory).restore_latest(abstract_state())
  assert step == 2
  assert_state_equal(state, 2)


def test_synchronous_save_failure_names_the_step(tmp_path, monkeypatch):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(1, make_state(1))
  _fail_finalizing(monkeypatch, 2)
  with pytest.raises(CheckpointSaveError, match="step 2 .*No space left.*step 1"):
    ckpt.save(2, make_state(2))
  ckpt.close()


@pytest.mark.parametrize("rows", [64, 64 * 256])  # host (numpy) and device (XLA) paths
def test_checksums_ignore_sharding_and_see_one_changed_element(rows):
  values = np.arange(rows * 8, dtype=np.float32).reshape(rows, 8)
  sharded = checksums.array_checksums({"a": jax.device_put(values, sharding())})
  single = checksums.array_checksums({"a": jax.device_put(values, jax.devices()[3])})
  assert sharded == single
  changed = values.copy()
  changed[17, 3] = np.nextafter(changed[17, 3], np.float32(np.inf))
  assert checksums.array_checksums({"a": jnp.asarray(changed)}) != single
  swapped = values.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert checksums.array_checksums({"a": jnp.asarray(swapped)}) != single
  same_bits = checksums.array_checksums({"a": jnp.asarray(values.view(np.int32))})
  assert same_bits["a"]["checksum"] == single["a"]["checksum"]  # the bits, with the dtype beside
  assert same_bits["a"]["dtype"] == "int32"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8", "uint8", "bool", "uint32"])
def test_checksums_cover_small_dtypes(dtype):
  base = np.zeros((4, 6), dtype)
  flipped = base.copy()
  flipped[2, 5] = np.ones((), dtype)
  a = checksums.array_checksums({"x": jnp.asarray(base)})["x"]["checksum"]
  b = checksums.array_checksums({"x": jnp.asarray(flipped)})["x"]["checksum"]
  assert a != b


@pytest.mark.integration
def test_checksum_cost_on_a_100mb_state(tmp_path):
  """Checksumming a ~100 MiB state (50 sharded arrays) costs well under a save."""
  state = nnx.State(
    {
      f"p{i}": jax.device_put(jax.random.normal(jax.random.key(i), (512, 1024)), sharding())
      for i in range(50)
    }
  )
  checksums.array_checksums(nnx.to_pure_dict(state))  # compile
  t = time.perf_counter()
  checksums.array_checksums(nnx.to_pure_dict(state))
  checksum_s = time.perf_counter() - t
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, state)
  ckpt.wait()
  t = time.perf_counter()
  ckpt.save(2, state)
  ckpt.wait()
  save_s = time.perf_counter() - t
  ckpt.close()
  print(f"checksums {checksum_s:.3f} s, whole save {save_s:.3f} s")
  assert checksum_s < save_s


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "bool", "uint16", "key"])
@pytest.mark.parametrize("spec", [None, ("x",), (None, "x"), "replicated"])
def test_host_and_device_checksums_agree(dtype, spec):
  """Small leaves are checksummed in numpy from their shards, large ones by XLA: same values."""
  mesh = jax.make_mesh((8,), ("x",))
  if dtype == "key":
    value = jax.random.split(jax.random.key(3), 16 * 8).reshape(16, 8)
  else:
    value = jnp.asarray(np.random.default_rng(0).integers(0, 200, (16, 8)).astype(dtype))
  if spec == "replicated":
    value = jax.device_put(value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  elif spec is not None:
    value = jax.device_put(
      value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    )
  host = checksums._checksum_on_host(value)  # pylint: disable=protected-access
  device = np.asarray(checksums._checksum_leaf(value))  # pylint: disable=protected-access
  np.testing.assert_array_equal(host, device)
