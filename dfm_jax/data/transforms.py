"""Per-image pixel operations on uint8 [H, W, C] arrays (C = 1 or 3) and their vectorised
forms for in-memory arrays [N, H, W, C]."""

from __future__ import annotations

import collections
import io
import logging
import threading
from typing import Callable

import numpy as np
from PIL import Image

CROPS = ("center", "pad")
_log = logging.getLogger(__name__)


def decode_image(encoded: bytes, channels: int) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes to uint8 [H, W, channels] (RGB or luminance)."""
  with Image.open(io.BytesIO(encoded)) as img:
    return pil_to_array(img, channels)


def pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
  """Fully decodes a PIL image to uint8 [H, W, channels]. High-bit-depth images keep their
  full range: 16-bit integers (PNG, TIFF; modes ``I;16*`` and ``I``) map 0..65535 to 0..255,
  floats (mode ``F``, e.g. float TIFFs) must lie in [0, 1] and map to 0..255 (PIL's own
  conversion clips the first and blackens the second)."""
  if img.mode.startswith("I") or img.mode == "F":
    img = Image.fromarray(_high_depth_to_uint8(np.asarray(img), img.mode), mode="L")
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")  # PIL warns when palette transparency is dropped directly
  img = img.convert("RGB" if channels == 3 else "L")  # convert() also forces the full decode
  arr = np.asarray(img, dtype=np.uint8)
  return arr if arr.ndim == 3 else arr[..., None]


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
  arr = arr.astype(np.float64)
  if mode == "F":
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(arr).all() and lo >= 0.0 and hi <= 1.0):
      raise ValueError(
        f"a floating-point image must hold values in [0, 1], this one spans [{lo:g}, {hi:g}]"
      )
    scaled = arr * 255.0
  else:
    scaled = np.clip(arr, 0, 65535) / 257.0  # 65535 -> 255
  return np.round(scaled).astype(np.uint8)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [..., C] -> [..., channels]; RGB -> L uses PIL's ITU-R 601-2 weights and rounding."""
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if c in (3, 4) and channels == 1:
    rgb = images[..., :3].astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]
  if c == 4 and channels == 3:
    return images[..., :3]
  raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
  """ADM-style crop of uint8 [H, W, C] to [resolution, resolution, C].

  Halves with a box filter while the short side is >= 2 * resolution (cheap anti-aliasing),
  resizes bicubically so the short side equals `resolution`, then takes the centre window.
  """
  c = image.shape[-1]
  img = Image.fromarray(image[..., 0] if c == 1 else image)
  while min(img.size) >= 2 * resolution:
    img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
  scale = resolution / min(img.size)
  size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
  if size != img.size:
    img = img.resize(size, Image.Resampling.BICUBIC)
  arr = np.asarray(img)
  top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
  arr = arr[top : top + resolution, left : left + resolution]
  return arr[..., None] if c == 1 else arr


def pad_offsets(height: int, width: int, resolution: int) -> tuple[int, int]:
  """(top, left) that centres an image of size height x width in resolution x resolution."""
  if height > resolution or width > resolution:
    raise ValueError(
      f"crop='pad' needs images no larger than data.resolution={resolution}, got {height}x{width}"
    )
  return (resolution - height) // 2, (resolution - width) // 2


def pad_to(images: np.ndarray, resolution: int) -> np.ndarray:
  """Zero-pads uint8 [..., H, W, C] to [..., resolution, resolution, C], image centred
  (the extra row/column of an odd margin goes to the bottom/right)."""
  h, w = images.shape[-3:-1]
  top, left = pad_offsets(h, w, resolution)
  out = np.zeros(images.shape[:-3] + (resolution, resolution, images.shape[-1]), np.uint8)
  out[..., top : top + h, left : left + w, :] = images
  return out


class PadSizes:
  """Counts, per image size, the images ``crop='pad'`` pads up to the resolution, and warns
  once (per process) when their sizes are mixed.

  ``crop='pad'`` is meant for datasets of one image size no larger than the resolution
  (28x28 digits in 32x32). An image of another size -- a 4x4 thumbnail among 32x32 pictures --
  is still padded, not failed on: it ends up a small patch in a black frame. The first time a
  second size shows up, one warning names the image, and the counts per size seen so far;
  ``counts()`` keeps counting (each grain worker process counts its own).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._counts: collections.Counter = collections.Counter()
    self._warned = False

  def add(self, height: int, width: int, resolution: int, name: Callable[[], str]) -> None:
    """Records one image of ``height x width`` about to be padded to ``resolution``;
    ``name()`` names it in the warning."""
    with self._lock:
      self._counts[(height, width)] += 1
      if self._warned or len(self._counts) < 2:
        return
      self._warned = True
      sizes = self._counts.most_common()
    padded = sum(n for (h, w), n in sizes if (h, w) != (resolution, resolution))
    listing = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sizes[:6])
    _log.warning(
      "crop='pad': images of different sizes are zero-padded to %dx%d (%s is %dx%d; "
      "images per size so far: %s; %d padded up). A small image becomes a small patch in a "
      "black frame: resize the odd ones or use crop='center'. Warned once per process; "
      "dfm_jax.data.transforms.padded_sizes() keeps counting.",
      resolution,
      resolution,
      name(),
      height,
      width,
      listing,
      padded,
    )

  def counts(self) -> dict[tuple[int, int], int]:
    """{(height, width): number of images of that size seen under crop='pad'}."""
    with self._lock:
      return dict(self._counts)

  def reset(self) -> None:
    with self._lock:
      self._counts.clear()
      self._warned = False


PAD_SIZES = PadSizes()


def padded_sizes() -> dict[tuple[int, int], int]:
  """{(height, width): images seen} of the records decoded under crop='pad' in this process."""
  return PAD_SIZES.counts()


def crop_to_resolution(image: np.ndarray, resolution: int, crop: str) -> np.ndarray:
  """uint8 [H, W, C] -> [resolution, resolution, C] with crop 'center' or 'pad'."""
  if crop == "pad":
    return pad_to(image, resolution)
  if crop == "center":
    if image.shape[:2] == (resolution, resolution):
      return image
    return center_crop(image, resolution)
  raise ValueError(f"unknown data.crop {crop!r}; expected one of {CROPS}")


def prepare_array(images: np.ndarray, resolution: int, channels: int, crop: str) -> np.ndarray:
  """Vectorised crop/channel conversion of uint8 [N, H, W, C] to [N, R, R, channels]."""
  images = to_channels(images, channels)
  if images.shape[1:3] == (resolution, resolution):
    return images
  if crop == "pad":
    return pad_to(images, resolution)
  return np.stack([crop_to_resolution(im, resolution, crop) for im in images])


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 in [0, 255] -> float32 in [-1, 1]."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
