"""The `data` config block: defaults, field access and the checks every source shares.

Each source validates its own fields (see `sources.py`, where sources register by name).
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import ml_collections

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
  # Videos (sources 'moving_digits', 'video_folder'): elements are [T, R, R, C] clips.
  frames=0,  # T, frames per clip; 0 = images
  frame_stride=1,  # video_folder: take every frame_stride-th source frame
  num_videos=10_000,  # moving_digits: dataset length (procedural, deterministic per index)
  num_digits=1,  # moving_digits: digits per video (the label is the first one's class)
  synthetic_examples=1024,  # synthetic, synthetic_latents: dataset length
)


def default_data_config() -> ml_collections.ConfigDict:
  """A complete `data` block for the embedded MNIST-5k digits (28x28 padded to 32x32)."""
  return ml_collections.ConfigDict(dict(_DEFAULTS))


def get(data, name: str):
  """`data.<name>`, or its default when the config omits the field."""
  return data.get(name, _DEFAULTS[name]) if hasattr(data, "get") else getattr(data, name)


def fail(field: str, problem: str) -> NoReturn:
  raise ValueError(f"data.{field}: {problem}")


def check_pad_fits(height: int, width: int, resolution: int, what: str):
  if height > resolution or width > resolution:
    fail(
      "crop",
      f"'pad' needs images no larger than data.resolution={resolution}, but "
      f"{what} is {height}x{width}; use crop='center' or a larger resolution",
    )


def check_file(field: str, path: str):
  if not path:
    fail(field, "is empty; it must name a file")
  if not os.path.isfile(path):
    fail(field, f"file {path!r} does not exist")
