"""storage: files written whole or not at all, and the one remote-path test."""

import json

import pytest

from dfm_jax import storage


def test_write_json_replaces_an_older_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "a.json"
  storage.write_json(path, {"b": 1})
  storage.write_json(path, {"b": 2, "a": [1, 2]})
  assert json.loads(path.read_text()) == {"a": [1, 2], "b": 2}
  assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_whole(tmp_path):
  path = tmp_path / "stats.npz"
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError, match="disk"):
    with storage.atomic_path(path) as tmp:
      assert tmp.suffix == ".npz" and tmp.parent == path.parent
      tmp.write_bytes(b"half of the new")
      raise RuntimeError("disk full")
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


@pytest.mark.parametrize(
  "path, remote", [("gs://b/x", True), ("hf://o/r@1", True), ("/tmp/x", False), ("rel/x", False)]
)
def test_is_remote(path, remote):
  assert storage.is_remote(path) is remote
