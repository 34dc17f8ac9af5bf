"""Metric writing (log + TensorBoard event files through tensorboardX) and image grids."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from etils import epath
from PIL import Image


class MetricWriter:
  """Scalars to the log and, on process 0, scalars and images to TensorBoard event files.

  Same method names as clu's metric writers; clu itself is not used because importing
  ``clu.metric_writers`` requires TensorFlow.
  """

  def __init__(self, logdir: str | None):
    self._tb = None
    if logdir is not None:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._tb = tensorboardX.SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if self._tb is None:
      return
    for key, value in scalars.items():
      self._tb.add_scalar(key, float(np.asarray(value)), step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    """Images as uint8 ``[H, W, C]`` or ``[N, H, W, C]``."""
    if self._tb is None:
      return
    for key, value in images.items():
      value = np.asarray(value)
      self._tb.add_images(key, value[None] if value.ndim == 3 else value, step, dataformats="NHWC")

  def write_text(self, step: int, texts: Mapping[str, str]):
    """Markdown texts (e.g. the config and the parameter table) for TensorBoard's text tab."""
    if self._tb is None:
      return
    for key, value in texts.items():
      self._tb.add_text(key, value, step)

  def write_hparams(self, config, metrics: Mapping[str, float]):
    """The config's scalar fields as hyperparameters (TensorBoard's HParams tab)."""
    if self._tb is None:
      return
    flat = {}

    def walk(prefix, node):
      for k, v in node.items():
        if hasattr(v, "items"):
          walk(f"{prefix}{k}.", v)
        elif isinstance(v, (bool, int, float, str)):
          flat[prefix + k] = v
        elif isinstance(v, (tuple, list)):
          flat[prefix + k] = str(tuple(v))

    walk("", config)
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top

    # Into the run's own event file (SummaryWriter.add_hparams would open a second run).
    values = {f"hparams/{k}": float(v) for k, v in metrics.items()}
    for summary in hparams(flat, values):
      self._tb._get_file_writer().add_summary(summary)  # pylint: disable=protected-access
    for tag, value in values.items():
      self._tb.add_scalar(tag, value, 0)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def create_writer(workdir: str) -> MetricWriter:
  """Logs and TensorBoard files on process 0; nothing on other processes."""
  if jax.process_index() != 0:
    return MetricWriter(None)
  return MetricWriter(str(epath.Path(workdir) / "tensorboard"))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """``[..., H, W, C]`` in [-1, 1] -> uint8 in [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
  """``[N, H, W, C]`` uint8 -> one ``[rows*(H+pad)+pad, ncol*(W+pad)+pad, 3]`` uint8 grid."""
  images = np.asarray(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  rows = -(-n // ncol)
  grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h,
      pad + col * (w + pad) : pad + col * (w + pad) + w,
    ] = img
  return grid


def save_png(path, image: np.ndarray, upscale: int = 1) -> None:
  """Writes uint8 ``[H, W, C]`` as a PNG to a local or ``gs://`` path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  img = Image.fromarray(np.asarray(image))
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  with path.open("wb") as f:
    img.save(f, format="PNG")
