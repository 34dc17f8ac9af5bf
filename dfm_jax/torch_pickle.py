"""Read PyTorch files with numpy only, without executing code from the file.

Supported layouts:

* zip archives written by ``torch.save`` (``<root>/data.pkl`` + raw storages ``<root>/data/<key>``),
* TorchScript archives written by ``torch.jit.save`` (same layout plus ``code/``; modules become
  plain attribute bags),
* the legacy (pre zip) ``torch.save`` stream: magic number, protocol, system info, object pickle,
  storage keys, then each storage as an int64 element count followed by its bytes.

Pickles are read with a restricted :class:`pickle.Unpickler` whose ``find_class`` only resolves
an explicit allow-list (tensor rebuild helpers, storage types, ``collections.OrderedDict`` and
``__torch__.*`` classes, which become inert attribute bags). Any other global raises
:class:`pickle.UnpicklingError` naming it, so a crafted file cannot run code on load.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

__all__ = ["load_torch_file", "load_torch_pickle", "TorchScriptObject"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "UntypedStorage": np.dtype(np.uint8),
}


class TorchScriptObject:
  """Inert stand-in for a ``__torch__.*`` class: pickled state becomes attributes."""

  _torch_class = "__torch__"

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.__dict__["_state"] = state

  def __repr__(self) -> str:
    return f"<{self._torch_class} {sorted(self.__dict__)}>"


class _StorageType:
  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


def _strided_view(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
  """Tensor ``size``/``stride`` (in elements) over a 1-D storage, bounds-checked."""
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f"invalid tensor layout size={size} stride={stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(
      f"tensor (offset {offset}, size {size}, stride {stride}) exceeds its storage "
      f"of {storage.size} elements"
    )
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(
    storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
  )


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  return _strided_view(storage, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  return data


def _restore_type_tag(value, type_str=None):
  return value


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
  ("collections", "OrderedDict"): collections.OrderedDict,
  # TorchScript tags typed lists and containers; the values themselves are plain data.
  ("torch.jit._pickle", "build_intlist"): list,
  ("torch.jit._pickle", "build_doublelist"): list,
  ("torch.jit._pickle", "build_boollist"): list,
  ("torch.jit._pickle", "build_tensorlist"): list,
  ("torch.jit._pickle", "build_genericlist"): list,
  ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler resolving only allow-listed globals; storages come from ``load_storage``."""

  def __init__(self, file, load_storage: Callable[[_StorageType, str, int], np.ndarray]):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage
    self._bag_classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "__torch__" or module.startswith("__torch__."):
      key = f"{module}.{name}"
      if key not in self._bag_classes:
        self._bag_classes[key] = type(name, (TorchScriptObject,), {"_torch_class": key})
      return self._bag_classes[key]
    raise pickle.UnpicklingError(
      f"refusing to load global '{module}.{name}': not in the allow-list of torch_pickle"
    )

  def persistent_load(self, pid: Any) -> Any:
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module" and len(pid) == 4:
      return pid[1]
    if kind != "storage" or len(pid) not in (5, 6):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"persistent id names no storage type: {pid!r}")
    storage = self._load_storage(storage_type, str(key), int(numel))
    view = pid[5] if len(pid) == 6 else None
    if view is not None:
      _view_key, view_offset, view_size = view
      storage = storage[int(view_offset) : int(view_offset) + int(view_size)]
    return storage


def _zip_root(zf: zipfile.ZipFile) -> str:
  roots = [
    n[: -len("data.pkl")] for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1
  ]
  if len(roots) != 1:
    raise pickle.UnpicklingError("zip archive has no single '<root>/data.pkl' record")
  return roots[0]


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    root = _zip_root(zf)
    names = set(zf.namelist())
    big_endian = f"{root}byteorder" in names and zf.read(f"{root}byteorder").strip() == b"big"
    loaded: dict[str, np.ndarray] = {}

    def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
      if key not in loaded:
        record = f"{root}data/{key}"
        if record not in names:
          raise pickle.UnpicklingError(f"storage record '{record}' is missing")
        raw = zf.read(record)
        dtype = storage_type.dtype.newbyteorder(">") if big_endian else storage_type.dtype
        if len(raw) < numel * dtype.itemsize:
          raise pickle.UnpicklingError(f"storage record '{record}' is truncated")
        loaded[key] = np.frombuffer(raw, dtype, count=numel).astype(
          storage_type.dtype, copy=big_endian
        )
      return loaded[key]

    return _RestrictedUnpickler(io.BytesIO(zf.read(f"{root}data.pkl")), load_storage).load()


def _load_legacy(path: str) -> Any:
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:

    def no_storage(*_):
      raise pickle.UnpicklingError("storage reference in a legacy header pickle")

    try:
      magic = _RestrictedUnpickler(f, no_storage).load()
    except (EOFError, pickle.UnpicklingError, ValueError) as e:
      raise pickle.UnpicklingError(
        f"{path} is neither a zip archive nor a torch.save file ({e})"
      ) from e
    if magic != _LEGACY_MAGIC:
      raise pickle.UnpicklingError(f"{path} is neither a zip archive nor a torch.save file")
    for _ in range(2):  # protocol version, system info
      _RestrictedUnpickler(f, no_storage).load()
    storages: dict[str, np.ndarray] = {}

    def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
      if key not in storages:
        if numel * storage_type.dtype.itemsize > file_size:
          raise pickle.UnpicklingError(f"storage '{key}' is larger than the file")
        storages[key] = np.empty(numel, storage_type.dtype)
      return storages[key]

    obj = _RestrictedUnpickler(f, load_storage).load()
    keys = _RestrictedUnpickler(f, no_storage).load()
    for key in keys:
      buf = storages[str(key)]
      numel = int(np.frombuffer(f.read(8), "<i8")[0])
      if numel != buf.size:
        raise pickle.UnpicklingError(f"storage '{key}' size mismatch")
      data = f.read(buf.nbytes)
      if len(data) != buf.nbytes:
        raise pickle.UnpicklingError(f"storage '{key}' is truncated")
      buf[...] = np.frombuffer(data, buf.dtype)
  return obj


def load_torch_pickle(path: str | os.PathLike) -> Any:
  """Unpickle a PyTorch file; tensors become (read-only) numpy arrays, modules attribute bags."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], seen: set[int]) -> None:
  if isinstance(obj, np.ndarray):
    out[prefix] = np.array(obj, copy=True)
    return
  if id(obj) in seen:
    return
  if isinstance(obj, TorchScriptObject):
    seen.add(id(obj))
    items = vars(obj).items()
  elif isinstance(obj, dict):
    seen.add(id(obj))
    items = obj.items()
  elif isinstance(obj, (list, tuple)):
    seen.add(id(obj))
    items = enumerate(obj)
  else:
    return
  for key, value in items:
    _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, seen)


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat ``{dotted name: array}`` of every tensor in a PyTorch file.

  A ``torch.save``'d state dict keeps its keys; nested containers (e.g. ``{"teacher": {...}}``)
  and TorchScript module trees are joined with dots (``net.layers.conv.weight``). Arrays are
  contiguous copies in the file's dtype (bfloat16 via ``ml_dtypes``).
  """
  out: dict[str, np.ndarray] = {}
  _flatten(load_torch_pickle(path), "", out, set())
  return out
