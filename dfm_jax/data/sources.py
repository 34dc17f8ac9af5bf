"""Random-access sources (grain `RandomAccessDataSource` protocol) whose element `i` is
{'image': uint8 [R, R, C] at the training resolution (float32 [h, w, c] for latents),
 'label': int32 []}.

In-memory sources drop their arrays when pickled: `mp_prefetch` workers reload them on first
access instead of receiving a copy.
"""

from __future__ import annotations

import collections
import logging
import os
import threading

import numpy as np
from PIL import Image

from dfm_jax.data import arrays
from dfm_jax.data import folder
from dfm_jax.data import transforms
from dfm_jax.data.config import get

_MAX_CONSECUTIVE_CORRUPT = 100
_log = logging.getLogger(__name__)
_skip_lock = threading.Lock()
_skipped: collections.Counter = collections.Counter()


class CorruptRecordError(ValueError):
    """An image file or record that cannot be decoded; the message names it."""


def skipped_records() -> dict[str, int]:
    """{record name: times skipped} for corrupt records replaced in this process (with
    num_workers > 0 the workers count their own and log each record once)."""
    with _skip_lock:
        return dict(_skipped)


def _count_skip(name: str, err: Exception):
    with _skip_lock:
        _skipped[name] += 1
        first, total = _skipped[name] == 1, sum(_skipped.values())
    if first:
        _log.warning("skipping unreadable %s (%s: %s); %d skip(s) so far in this process",
                     name, type(err).__name__, err, total)


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"data.num_classes: labels of {name} span {labels.min()}.."
                         f"{labels.max()}, outside [0, {num_classes})")


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
                images = transforms.prepare_array(images, self._resolution, self._channels,
                                                  self._crop)
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
    """Precomputed latents from an .npz: `latents` [N, h, w, c], `labels` [N]."""

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
    """

    pixels = True

    def __init__(self, records, resolution: int, crop: str, skip_corrupt: bool):
        self._records, self._resolution = records, resolution
        self._crop, self._skip_corrupt = crop, skip_corrupt

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self._records)
        for attempt in range(min(n, _MAX_CONSECUTIVE_CORRUPT)):
            i = (index + attempt) % n
            try:
                image, label = self._records.load(i)
            except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, ...
                name = self._records.record_name(i)
                if not self._skip_corrupt:
                    raise CorruptRecordError(
                        f"cannot decode {name}: {type(err).__name__}: {err} (set "
                        "data.skip_corrupt=True to skip unreadable images)") from err
                _count_skip(name, err)
                continue
            try:
                image = transforms.crop_to_resolution(image, self._resolution, self._crop)
            except ValueError as err:
                raise ValueError(f"{self._records.record_name(i)}: {err}") from err
            return {"image": image, "label": np.int32(label)}
        raise CorruptRecordError(f"{_MAX_CONSECUTIVE_CORRUPT} consecutive unreadable records "
                                 f"from {self._records.record_name(index)}")


def open_source(data, split: str | None = None):
    """The source for `data` (config validated by the caller); `split` overrides data.split
    and is only meaningful for tfds."""
    kind = get(data, "source")
    if split is not None and split != get(data, "split") and kind != "tfds":
        raise ValueError(f"split {split!r} requested, but data.source={kind!r} has one set of "
                         "files; point data.path at the other split instead")
    if kind in ("mnist5k", "idx"):
        return ArraySource(data)
    if kind == "latents":
        return LatentSource(data)
    if kind == "folder":
        records = FolderRecords(get(data, "path"), get(data, "channels"))
    elif kind == "tfds":
        from dfm_jax.data.tfds_source import TfdsRecords  # pylint: disable=g-import-not-at-top

        records = TfdsRecords(get(data, "tfds_name"), split or get(data, "split"),
                              get(data, "data_dir"), get(data, "image_key"),
                              get(data, "label_key"), get(data, "channels"))
    else:
        raise ValueError(f"data.source: unknown source {kind!r}")
    return DecodedSource(records, get(data, "resolution"), get(data, "crop"),
                         get(data, "skip_corrupt"))
