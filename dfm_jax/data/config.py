"""The `data` config block: defaults, field access and cheap validation."""

from __future__ import annotations

import math
import os
import zipfile
from typing import Any, NoReturn

import ml_collections

from dfm_jax.data import arrays
from dfm_jax.data import folder
from dfm_jax.data.transforms import CROPS

SOURCES = ("mnist5k", "tfds", "folder", "idx", "latents")
PIXEL_SOURCES = ("mnist5k", "tfds", "folder", "idx")
MNIST5K_SHAPE = (28, 28)

_DEFAULTS: dict[str, Any] = dict(
    source="mnist5k",
    tfds_name="",
    split="train",
    data_dir=None,
    path="",
    label_path="",
    image_key="image",
    label_key="label",
    resolution=32,
    channels=1,
    crop="pad",
    random_flip=False,
    skip_corrupt=False,
    num_workers=0,
    num_classes=10,
    latent_scale=1.0,
)


def default_data_config() -> ml_collections.ConfigDict:
    """A complete `data` block for the embedded MNIST-5k digits (28x28 padded to 32x32)."""
    return ml_collections.ConfigDict(dict(_DEFAULTS))


def get(data, name: str):
    """`data.<name>`, or its default when the config omits the field."""
    return data.get(name, _DEFAULTS[name]) if hasattr(data, "get") else getattr(data, name)


def _fail(field: str, problem: str) -> NoReturn:
    raise ValueError(f"data.{field}: {problem}")


def _check_pad_fits(height: int, width: int, resolution: int, what: str):
    if height > resolution or width > resolution:
        _fail("crop", f"'pad' needs images no larger than data.resolution={resolution}, but "
                      f"{what} is {height}x{width}; use crop='center' or a larger resolution")


def _check_file(field: str, path: str):
    if not path:
        _fail(field, "is empty; it must name a file")
    if not os.path.isfile(path):
        _fail(field, f"file {path!r} does not exist")


def validate_data_config(data) -> None:
    """Checks `data` before anything heavy is loaded; raises ValueError naming field and problem.

    Reads only headers and directory listings: idx headers, npz array headers, the first image
    of a folder, the tfds dataset_info.
    """
    source = get(data, "source")
    if source not in SOURCES:
        _fail("source", f"unknown source {source!r}; expected one of {SOURCES}")
    num_workers = get(data, "num_workers")
    if not isinstance(num_workers, int) or num_workers < 0:
        _fail("num_workers", f"must be an int >= 0, got {num_workers!r}")
    num_classes = get(data, "num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        _fail("num_classes", f"must be an int >= 1, got {num_classes!r}")
    if source == "latents":
        scale = get(data, "latent_scale")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            _fail("latent_scale", f"must be a finite non-zero number, got {scale!r}")
        _validate_latents(data)
        return
    resolution, channels, crop = get(data, "resolution"), get(data, "channels"), get(data, "crop")
    if not isinstance(resolution, int) or resolution <= 0:
        _fail("resolution", f"must be a positive int, got {resolution!r}")
    if channels not in (1, 3):
        _fail("channels", f"must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if crop not in CROPS:
        _fail("crop", f"unknown crop {crop!r}; expected one of {CROPS}")
    if source == "mnist5k":
        arrays.mnist5k_path()
        if num_classes < 10:
            _fail("num_classes", f"MNIST has 10 classes, got num_classes={num_classes}")
        if crop == "pad":
            _check_pad_fits(*MNIST5K_SHAPE, resolution, "an MNIST digit")
    elif source == "idx":
        _validate_idx(data, crop, resolution)
    elif source == "folder":
        _validate_folder(data, crop, resolution, num_classes)
    else:
        _validate_tfds(data, crop, resolution, num_classes)


def _validate_idx(data, crop: str, resolution: int):
    path = get(data, "path")
    _check_file("path", path)
    try:
        dtype, shape = arrays.read_idx_header(path)
    except (ValueError, OSError) as err:
        _fail("path", f"cannot read idx images {path!r}: {err}")
    if dtype.kind != "u" or dtype.itemsize != 1 or len(shape) not in (3, 4):
        _fail("path", f"idx images in {path!r} must be uint8 [N,H,W(,C)], got {dtype} {shape}")
    try:
        label_path = arrays.idx_label_path(path, get(data, "label_path"))
    except ValueError as err:
        _fail("label_path", str(err).removeprefix("data.label_path "))
    _check_file("label_path", label_path)
    try:
        _, label_shape = arrays.read_idx_header(label_path)
    except (ValueError, OSError) as err:
        _fail("label_path", f"cannot read idx labels {label_path!r}: {err}")
    if label_shape != shape[:1]:
        _fail("label_path", f"{label_path!r} holds labels of shape {label_shape} for {shape[0]} "
                            f"images in {path!r}")
    if crop == "pad":
        _check_pad_fits(shape[1], shape[2], resolution, f"{path!r}'s image size")


def _validate_folder(data, crop: str, resolution: int, num_classes: int):
    root = get(data, "path")
    if not root:
        _fail("path", "is empty; it must name the image folder")
    if not os.path.isdir(root):
        _fail("path", f"folder {root!r} does not exist")
    try:
        classes = folder.class_names(root)
        first = folder.first_image(root)
    except ValueError as err:
        _fail("path", str(err))
    if first is None:
        _fail("path", f"folder {root!r} holds no images ({', '.join(folder.IMAGE_EXTENSIONS)})")
    if len(classes) > num_classes:
        _fail("num_classes", f"{root!r} has {len(classes)} class folders but num_classes is "
                             f"{num_classes}")
    if crop == "pad":
        try:
            width, height = folder.image_size(first)
        except OSError as err:
            _fail("path", f"cannot read image {first!r}: {err}")
        _check_pad_fits(height, width, resolution, f"{first!r}")


def _validate_tfds(data, crop: str, resolution: int, num_classes: int):
    from dfm_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    name = get(data, "tfds_name")
    if not name:
        _fail("tfds_name", "is empty; source='tfds' needs a dataset name such as 'imagenet2012'")
    try:
        info = tfds_source.dataset_info(name, get(data, "data_dir"))
    except ValueError as err:
        _fail("tfds_name", str(err))
    split = get(data, "split")
    try:
        info.splits[split]
    except (KeyError, ValueError):
        _fail("split", f"{name!r} has no split {split!r} (splits: {sorted(info.splits)})")
    image_key, label_key = get(data, "image_key"), get(data, "label_key")
    if image_key not in info.features:
        _fail("image_key", f"{name!r} has no feature {image_key!r} (features: "
                           f"{sorted(info.features)})")
    if label_key and label_key not in info.features:
        _fail("label_key", f"{name!r} has no feature {label_key!r} (features: "
                           f"{sorted(info.features)}); use '' for unlabelled data")
    classes = getattr(info.features[label_key], "num_classes", None) if label_key else None
    if classes is not None and classes > num_classes:
        _fail("num_classes", f"{name!r} has {classes} classes but num_classes is {num_classes}")
    shape = getattr(info.features[image_key], "shape", None)
    if crop == "pad" and shape and shape[0] is not None and shape[1] is not None:
        _check_pad_fits(shape[0], shape[1], resolution, f"{name!r}'s {image_key!r}")


def _validate_latents(data):
    path = get(data, "path")
    _check_file("path", path)
    try:
        specs = arrays.npz_array_specs(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        _fail("path", f"cannot read npz {path!r}: {err}")
    missing = {"latents", "labels"} - set(specs)
    if missing:
        _fail("path", f"npz {path!r} lacks required array(s) {sorted(missing)}; it has "
                      f"{sorted(specs)}")
    (lat_shape, lat_dtype), (lab_shape, lab_dtype) = specs["latents"], specs["labels"]
    if len(lat_shape) != 4 or lat_dtype.kind != "f":
        _fail("path", f"npz {path!r}: latents must be float [N,h,w,c], got {lat_dtype} {lat_shape}")
    if lab_shape != lat_shape[:1] or lab_dtype.kind not in "iu":
        _fail("path", f"npz {path!r}: labels must be int [{lat_shape[0]}], got {lab_dtype} "
                      f"{lab_shape}")
