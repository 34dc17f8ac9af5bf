"""Latent shard sets: encoded datasets as ArrayRecord shards plus ``metadata.json``.

Written by ``python -m dfm_jax.encode`` and read by the ``latents`` data source when
``data.path`` is a folder (local or ``gs://``; all I/O goes through ``etils.epath``).

Layout of a shard set ``DIR``::

  DIR/metadata.json                           written last (by process 0): the set is complete
  DIR/shard-00000-of-000NN.array_record       ArrayRecord files (group_size:1, uncompressed), one
  ...                                          record per example, in order
  DIR/.progress/plan.json                      the settings of the encoding (checked on resume)
  DIR/.progress/shard-00000-of-000NN.json      one per completed shard: records, bytes, sha256,
                                               per-channel statistics (the resume markers)

Record layout (`record_format`), little-endian, no padding::

  bytes [0, 4)            label, int32
  bytes [4, 4 + 2*h*w*c)  latents, float16, C order [h, w, c] (videos: [T, h, w, c], 2*T*h*w*c
                          bytes)

``metadata.json`` holds: ``format``, ``count`` (records), ``latent_shape`` ([h, w, c] for
images, [T, h, w, c] for videos: T latent frames per clip), ``dtype`` ("float16"),
``record_format``, ``channel_mean`` / ``channel_std`` (per channel over every stored value of
the set, as stored in float16, in float64 arithmetic), ``label_range`` [min, max],
``autoencoder`` (kind, weights, scale, shift, ...), ``source`` (the pixel data block), ``flip``
(True: record 2i is example i and record 2i+1 its horizontal mirror, every frame of a clip
mirrored), ``shard_size`` and ``shards`` ([{name, records, bytes, sha256}] in record order). It
holds no time stamps, so an interrupted and resumed encoding writes the same bytes as one
straight run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile

from array_record.python import array_record_data_source
from array_record.python import array_record_module
from etils import epath
import numpy as np

from dfm_jax.data.corrupt import read_skipping
from dfm_jax import storage

FORMAT = "dfm_jax.latent_shards/1"
METADATA = "metadata.json"
PROGRESS_DIR = ".progress"
PLAN = "plan.json"
DTYPE = np.dtype("<f2")
LABEL_DTYPE = np.dtype("<i4")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # float16 latents barely compress


def record_format(shape) -> str:
  """The record layout of latents of `shape` ([h, w, c] or [T, h, w, c]), for metadata.json."""
  axes = "[h, w, c]" if len(shape) == 3 else "[T, h, w, c]"
  return f"label int32 LE (4 bytes), then latents float16 LE {axes} C order"


def shard_name(index: int, num_shards: int) -> str:
  """``shard-00003-of-00010.array_record``."""
  return f"shard-{index:05d}-of-{num_shards:05d}.array_record"


def pack_record(latent: np.ndarray, label: int) -> bytes:
  """One record from latents [h, w, c] or [T, h, w, c] (stored as float16) and an int label."""
  return np.asarray(label, LABEL_DTYPE).tobytes() + np.ascontiguousarray(latent, DTYPE).tobytes()


def unpack_record(raw: bytes, shape) -> tuple[np.ndarray, np.int32]:
  """(latents float16 of `shape`, label int32) of one record; raises ValueError on a bad size."""
  size = LABEL_DTYPE.itemsize + DTYPE.itemsize * math.prod(shape)
  if len(raw) != size:
    raise ValueError(f"latent record of {len(raw)} bytes, expected {size} for shape {list(shape)}")
  label = np.frombuffer(raw, LABEL_DTYPE, 1)[0].astype(np.int32)
  return np.frombuffer(raw, DTYPE, offset=LABEL_DTYPE.itemsize).reshape(shape), label


# ---------------------------------------------------------------------------------------------
# Per-channel statistics, mergeable across shards (Chan et al.'s parallel variance).


def channel_stats(latents: np.ndarray) -> dict:
  """{'count', 'mean' [c], 'm2' [c]} over every value of latents [N, ..., c], in float64."""
  x = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
  mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[-1])
  return {
    "count": int(len(x)),
    "mean": mean.tolist(),
    "m2": np.square(x - mean).sum(axis=0).tolist(),
  }


def merge_stats(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(mean [c], std [c]) of the union of `channel_stats` parts (population std)."""
  count, mean, m2 = 0, None, None
  for p in parts:
    n_b, mean_b, m2_b = p["count"], np.asarray(p["mean"]), np.asarray(p["m2"])
    if n_b == 0:
      continue
    if mean is None:
      count, mean, m2 = n_b, mean_b, m2_b
      continue
    n = count + n_b
    delta = mean_b - mean
    mean = mean + delta * (n_b / n)
    m2 = m2 + m2_b + np.square(delta) * (count * n_b / n)
    count = n
  if mean is None:
    raise ValueError("no latents to take statistics of")
  return mean, np.sqrt(m2 / count)


# ---------------------------------------------------------------------------------------------
# Writing.


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _write_array_record(path: str, latents: np.ndarray, labels: np.ndarray) -> None:
  writer = array_record_module.ArrayRecordWriter(path, _WRITER_OPTIONS)
  try:
    for latent, label in zip(latents, labels):
      writer.write(pack_record(latent, int(label)))
  finally:
    writer.close()


def start(out: str | os.PathLike, plan: dict) -> None:
  """Creates `out` and records `plan` (the encoding settings), or checks that a partial
  encoding already there was made with the same plan (ValueError otherwise)."""
  out = epath.Path(out)
  progress = out / PROGRESS_DIR
  progress.mkdir(parents=True, exist_ok=True)
  plan_path = progress / PLAN
  text = json.dumps(plan, indent=1, sort_keys=True)
  if plan_path.exists():
    old = json.loads(plan_path.read_text())
    if old != json.loads(text):
      diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      raise ValueError(
        f"--out {os.fspath(out)} holds a (partial) encoding with other settings "
        f"(differing: {', '.join(diff)}); resume with the same settings or "
        "choose an empty --out"
      )
    return
  if (out / METADATA).exists():
    raise ValueError(
      f"--out {os.fspath(out)} already holds a shard set without a plan; choose an empty --out"
    )
  storage.write_text(plan_path, text)


def completed_shards(out: str | os.PathLike, num_shards: int) -> dict[int, dict]:
  """{shard index: its progress record} for shards whose marker and file both exist and whose
  file has the recorded size (shards are renamed into place only when complete)."""
  out = epath.Path(out)
  progress = out / PROGRESS_DIR
  if not progress.exists():
    return {}
  names = {p.name for p in out.iterdir()}
  done = {}
  for index in range(num_shards):
    name = shard_name(index, num_shards)
    marker = progress / (name.removesuffix(".array_record") + ".json")
    if name not in names or not marker.exists():
      continue
    info = json.loads(marker.read_text())
    if (out / name).stat().length != info["bytes"]:
      continue
    done[index] = info
  return done


def write_shard(
  out: str | os.PathLike, index: int, num_shards: int, latents: np.ndarray, labels: np.ndarray
) -> dict:
  """Writes shard `index` of latents [N, h, w, c] or [N, T, h, w, c] (stored as float16) and
  labels [N], then its progress marker; returns that record ({name, records, bytes, sha256,
  stats, labels})."""
  out = epath.Path(out)
  name = shard_name(index, num_shards)
  with np.errstate(over="ignore"):
    stored = np.ascontiguousarray(latents, DTYPE)
  if not np.isfinite(stored).all():
    raise ValueError(f"shard {name}: latents overflow float16 (|z| > 65504) or are not finite")
  final, tmp = out / name, out / (name + ".tmp")
  if not storage.is_remote(out):
    _write_array_record(os.fspath(tmp), stored, labels)
    digest, size = _sha256(os.fspath(tmp)), tmp.stat().length
  else:
    local_dir = tempfile.mkdtemp(prefix="dfm_shard_")
    try:
      local = os.path.join(local_dir, name)
      _write_array_record(local, stored, labels)
      digest, size = _sha256(local), os.path.getsize(local)
      epath.Path(local).copy(tmp, overwrite=True)
    finally:
      shutil.rmtree(local_dir, ignore_errors=True)
  tmp.rename(final)
  info = {
    "name": name,
    "records": int(len(stored)),
    "bytes": int(size),
    "sha256": digest,
    "stats": channel_stats(stored),
    "labels": [int(labels.min()), int(labels.max())] if len(labels) else [0, -1],
  }
  marker = out / PROGRESS_DIR / (name.removesuffix(".array_record") + ".json")
  storage.write_text(marker, json.dumps(info, sort_keys=True))
  return info


def finalize(out: str | os.PathLike, plan: dict) -> dict:
  """Writes ``metadata.json`` from the plan and every shard's progress record (all shards
  must be complete); returns the metadata."""
  num_shards = plan["num_shards"]
  done = completed_shards(out, num_shards)
  missing = [i for i in range(num_shards) if i not in done]
  if missing:
    raise ValueError(
      f"{os.fspath(out)}: shard(s) {missing[:10]} of {num_shards} are not "
      "complete; run the same command again to finish them"
    )
  infos = [done[i] for i in range(num_shards)]
  mean, std = merge_stats([i["stats"] for i in infos])
  lows = [i["labels"][0] for i in infos if i["records"]]
  highs = [i["labels"][1] for i in infos if i["records"]]
  meta = {
    **{k: v for k, v in plan.items() if k != "num_shards"},
    "format": FORMAT,
    "count": int(sum(i["records"] for i in infos)),
    "dtype": "float16",
    "record_format": record_format(plan["latent_shape"]),
    "channel_mean": mean.tolist(),
    "channel_std": std.tolist(),
    "label_range": [min(lows), max(highs)],
    "shards": [{k: i[k] for k in ("name", "records", "bytes", "sha256")} for i in infos],
  }
  if meta["count"] != plan["count"]:
    raise ValueError(
      f"{os.fspath(out)}: shards hold {meta['count']} records, the plan {plan['count']}"
    )
  storage.write_text(epath.Path(out) / METADATA, json.dumps(meta, indent=1, sort_keys=True))
  return meta


# ---------------------------------------------------------------------------------------------
# Reading.


def is_shard_set(path: str | os.PathLike) -> bool:
  """True when `path` is a folder (or prefix) holding ``metadata.json``."""
  return bool(path) and (epath.Path(path) / METADATA).exists()


def read_metadata(path: str | os.PathLike) -> dict:
  """The metadata of the shard set at `path`; ValueError naming the problem."""
  meta_path = epath.Path(path) / METADATA
  if not meta_path.exists():
    raise ValueError(
      f"{os.fspath(path)!r} is neither an .npz file nor a latent shard folder "
      f"(no {METADATA}; an unfinished encoding writes it last)"
    )
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, ValueError) as err:
    raise ValueError(f"cannot read {os.fspath(meta_path)!r}: {err}") from err
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{os.fspath(meta_path)!r} is not a {FORMAT} metadata file")
  return meta


def latent_shape(path: str | os.PathLike) -> tuple[int, ...]:
  """[h, w, c] (videos: [T, h, w, c]) of the stored latents of an .npz file or a shard folder
  (headers only)."""
  if os.fspath(path).endswith(".npz") or epath.Path(path).is_file():
    from dfm_jax.data import arrays  # pylint: disable=g-import-not-at-top

    return tuple(int(v) for v in arrays.npz_array_specs(os.fspath(path))["latents"][0][1:])
  return tuple(int(v) for v in read_metadata(path)["latent_shape"])


def check_latent_shape(where: str, shape, resolution: int, channels: int, frames: int) -> None:
  """Checks stored latents of `shape` ([h, w, c], videos [T, h, w, c]) against the config:
  T = `frames` (0 for images), h = w = `resolution`, c = `channels`. One ValueError starting
  with `where` (e.g. "latent shards in '/data/set'") and naming the fields to set, without
  the ``data.<field>:`` prefix."""
  if len(shape) == 4 and not frames:
    raise ValueError(
      f"{where} are clips of {shape[0]} frames [T, h, w, c] = {list(shape)}, but data.frames=0 "
      f"(images); set data.frames={shape[0]}"
    )
  if len(shape) == 3 and frames:
    raise ValueError(
      f"{where} are images [h, w, c] = {list(shape)}, but data.frames={frames} (videos); set "
      "data.frames=0, or encode a video source"
    )
  if len(shape) == 4 and shape[0] != frames:
    raise ValueError(
      f"{where} are clips of {shape[0]} latent frames, but data.frames={frames}; set "
      f"data.frames={shape[0]} (or encode clips of {frames} frames)"
    )
  h, w, c = shape[-3:]
  if (h, w, c) != (resolution, resolution, channels):
    raise ValueError(
      f"{where} are [h, w, c] = [{h}, {w}, {c}], but the config says data.resolution="
      f"{resolution} and data.channels={channels} ([{resolution}, {resolution}, {channels}]); "
      f"set data.resolution={h} and data.channels={c} (latent grid and channels), or encode at "
      "another resolution"
    )


def check_shard_set(
  path: str | os.PathLike, resolution: int, channels: int, frames: int, num_classes: int
) -> dict:
  """Checks a shard set against the config (`check_latent_shape`, labels < `num_classes`,
  every shard present); returns its metadata. One ValueError per problem, without the
  ``data.<field>:`` prefix."""
  meta = read_metadata(path)
  where = f"latent shards in {os.fspath(path)!r}"
  check_latent_shape(where, meta["latent_shape"], resolution, channels, frames)
  low, high = meta["label_range"]
  if meta["count"] and (low < 0 or high >= num_classes):
    raise ValueError(
      f"labels of {os.fspath(path)!r} span {low}..{high}, outside [0, "
      f"{num_classes}) (data.num_classes)"
    )
  names = {p.name for p in epath.Path(path).iterdir()}
  missing = [s["name"] for s in meta["shards"] if s["name"] not in names]
  if missing:
    raise ValueError(
      f"{os.fspath(path)!r} lacks {len(missing)} shard file(s) listed in "
      f"{METADATA}, e.g. {missing[0]}"
    )
  if not storage.is_remote(
    epath.Path(path)
  ):  # sizes are one stat each here (a bucket: read-time checks)
    for shard in meta["shards"]:
      size = os.path.getsize(os.path.join(os.fspath(path), shard["name"]))
      if "bytes" in shard and size != shard["bytes"]:
        raise ValueError(
          f"shard {os.path.join(os.fspath(path), shard['name'])} is {size} bytes, {METADATA} "
          f"says {shard['bytes']}: truncated or replaced since it was encoded; encode the set "
          "again"
        )
  return meta


class LatentShards:
  """Random access over every record of a shard set, in order.

  Element i is {'image': float32 [h, w, c] (videos [T, h, w, c]), 'label': int32 []}. Readers
  open lazily (per process, so it pickles for grain workers).
  """

  pixels = False

  def __init__(
    self, path: str | os.PathLike, metadata: dict | None = None, skip_corrupt: bool = False
  ):
    self._path = os.fspath(path)
    self.metadata = metadata or read_metadata(path)
    self._shape = tuple(self.metadata["latent_shape"])
    self._reader = None
    self._skip_corrupt = skip_corrupt
    self._starts = np.cumsum([0] + [s["records"] for s in self.metadata["shards"]])

  def __getstate__(self):
    return {**self.__dict__, "_reader": None}

  def _records(self):
    if self._reader is None:
      root = epath.Path(self._path)
      # "[0:n]" gives each file's record count, so no file is opened up front.
      paths = [
        f"{os.fspath(root / s['name'])}[0:{s['records']}]"
        for s in self.metadata["shards"]
        if s["records"]
      ]
      self._reader = array_record_data_source.ArrayRecordDataSource(paths)
    return self._reader

  def __len__(self) -> int:
    return int(self.metadata["count"])

  def _element(self, raw: bytes) -> dict[str, np.ndarray]:
    latent, label = unpack_record(raw, self._shape)
    return {"image": latent.astype(np.float32), "label": label}

  def record_name(self, index: int) -> str:
    """``<folder>/shard-....array_record record <j>``: where record ``index`` is stored."""
    k = int(np.searchsorted(self._starts, index, side="right") - 1)
    name = self.metadata["shards"][k]["name"]
    return f"{os.path.join(self._path, name)} record {index - int(self._starts[k])}"

  def _load(self, index: int) -> dict[str, np.ndarray]:
    return self._element(self._records()[index])

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    """Record ``index``; a damaged one raises CorruptRecordError naming its shard file, or
    with ``skip_corrupt`` is replaced by the next readable record."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} outside [0, {len(self)})")
    return read_skipping(self._load, self.record_name, index, len(self), self._skip_corrupt)[1]

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    try:
      return [self._element(r) for r in self._records().__getitems__([int(i) for i in indices])]
    except Exception:  # pylint: disable=broad-except  # a damaged record: one by one, named
      return [self[i] for i in indices]

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(latents float16 [N, h, w, c] (videos [N, T, h, w, c]), labels int32 [N]) of the whole
    set, read in order."""
    out = np.empty((len(self),) + self._shape, DTYPE)
    labels = np.empty((len(self),), np.int32)
    for i in range(len(self)):
      out[i], labels[i] = unpack_record(self._records()[i], self._shape)
    return out, labels
