"""Synthetic data with a config's shapes and classes: smoke tests of a big config (its
``runlocal`` variant) on a machine without its data.

Element ``i`` is deterministic in ``i``: a smooth random field (a 4x4 grid of values per channel,
bilinearly upsampled) plus a class-dependent brightness and a little pixel noise, so the pyramid
bands have the layout of natural data (most variance coarse) and the label matters. Videos drift
the field by one pixel per frame. Pixels are uint8 ``[R, R, C]`` (videos ``[T, R, R, C]``);
latents are float32 of about unit scale.
"""

from __future__ import annotations

import numpy as np

_GRID = 4  # the random field's control points per side


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
  """Bilinear ``[g, g, C]`` -> ``[size, size, C]`` (corners aligned)."""
  g = grid.shape[0]
  pos = np.linspace(0.0, g - 1.0, size)
  lo = np.minimum(pos.astype(np.int64), g - 2)
  frac = (pos - lo)[:, None]
  rows = grid[lo] * (1.0 - frac[..., None]) + grid[lo + 1] * frac[..., None]
  return rows[:, lo] * (1.0 - frac[None]) + rows[:, lo + 1] * frac[None]


class SyntheticSource:
  """``count`` elements {'image', 'label'} of ``shape`` (``[R, R, C]`` or ``[T, R, R, C]``);
  uint8 pixels when ``pixels``, else float32 latents. Labels cycle through ``num_classes``."""

  def __init__(self, shape: tuple[int, ...], num_classes: int, count: int, pixels: bool):
    self.shape, self.num_classes, self.count, self.pixels = shape, num_classes, count, pixels

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.count:
      raise IndexError(f"synthetic element {index} of {self.count}")
    rng = np.random.default_rng(index)
    label = index % self.num_classes
    *frames, size, _, channels = self.shape
    steps = frames[0] if frames else 1
    field = _upsample(rng.standard_normal((_GRID, _GRID, channels)), size + steps - 1)
    brightness = 2.0 * label / max(self.num_classes - 1, 1) - 1.0
    clips = np.stack([field[t : t + size, t : t + size] for t in range(steps)])
    x = clips + 0.5 * brightness + 0.1 * rng.standard_normal(clips.shape)
    x = x if frames else x[0]
    if self.pixels:
      image = np.clip(np.round(127.5 + 60.0 * x), 0, 255).astype(np.uint8)
    else:
      image = x.astype(np.float32)
    return {"image": image, "label": np.int32(label)}
