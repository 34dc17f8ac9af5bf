"""Image-folder layout: class subfolders sorted by name give labels 0..K-1 (as torchvision's
ImageFolder); a folder with images and no subfolders is one class, label 0."""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (
  ".bmp",
  ".gif",
  ".jpeg",
  ".jpg",
  ".png",
  ".pgm",
  ".ppm",
  ".tif",
  ".tiff",
  ".webp",
)


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def class_names(root: str) -> list[str]:
  """Sorted class subfolder names of `root` ([] when the images sit directly in `root`)."""
  with os.scandir(root) as entries:
    entries = list(entries)
  dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
  loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
  if dirs and loose:
    raise ValueError(
      f"folder {root!r} mixes class subfolders ({dirs[:3]}...) with images at "
      f"its top level ({loose[:3]}...); move the images into a class folder"
    )
  return dirs


def _walk_images(folder: str):
  """Image paths under `folder`, recursively, in sorted order."""
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if _is_image(name):
        yield os.path.join(dirpath, name)


def first_image(root: str) -> str | None:
  """The first image `list_images` would return, found without walking the whole tree."""
  return next(_walk_images(root), None)


def image_size(path: str) -> tuple[int, int]:
  """(width, height) from the image header."""
  with Image.open(path) as img:
    return img.size


@functools.lru_cache(maxsize=4)
def list_images(root: str) -> tuple[np.ndarray, np.ndarray]:
  """Scans `root` once per process.

  Returns:
    paths: bytes [N] (numpy 'S'), file paths relative to `root`, sorted by class then path.
    labels: int32 [N], index of the class folder in sorted order (0 without class folders).
  """
  classes = class_names(root)
  rel, labels = [], []
  for label, folder in enumerate(classes or [""]):
    found = [os.path.relpath(p, root) for p in _walk_images(os.path.join(root, folder))]
    if classes and not found:
      raise ValueError(f"class folder {os.path.join(root, folder)!r} holds no images")
    rel += found
    labels += [label] * len(found)
  if not rel:
    raise ValueError(f"folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  paths = np.array([os.fsencode(p) for p in rel], dtype=np.bytes_)
  return paths, np.asarray(labels, np.int32)
