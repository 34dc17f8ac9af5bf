"""Writing sample videos: animated GIF (Pillow), MP4 (PyAV, optional), grids and contact sheets.

All videos are uint8 ``[T, H, W, C]`` with C = 1 (grey) or 3 (RGB); batches are
``[N, T, H, W, C]``. MP4 needs the optional ``av`` package (PyAV) with an H.264 (``libx264``) or
MPEG-4 Part 2 (``mpeg4``) encoder; `write_mp4` returns False when neither is available, so
callers can fall back to `write_gif`.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction

import numpy as np
from PIL import Image

__all__ = ["write_gif", "write_mp4", "mp4_codec", "video_grid", "contact_sheet", "save_png"]

MP4_CODECS = ("libx264", "mpeg4")


def _check_video(video: np.ndarray, ndim: int = 4) -> np.ndarray:
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != ndim or video.shape[-1] not in (1, 3):
    lead = "[T, H, W, C]" if ndim == 4 else "[N, T, H, W, C]"
    raise ValueError(f"expected uint8 {lead} with C in (1, 3), got {video.dtype} {video.shape}")
  if video.shape[0] == 0:
    raise ValueError("no frames to write")
  return video


def _makedirs_for(path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_gif(path: str, video: np.ndarray, fps: float = 8.0, loop: int = 0) -> str:
  """Writes ``video`` uint8 [T, H, W, C] as an animated GIF looping `loop` times (0: forever).

  GIF delays are stored in 10 ms units, so the frame time is ``round(100 / fps) * 10`` ms.
  Grey videos keep their 256 levels exactly; RGB frames are quantised to a 256-colour palette.
  Pillow stores a run of identical consecutive frames as one frame showing for the summed time,
  so playback is unchanged but a reader may count fewer frames than T. Returns `path`.
  """
  video = _check_video(video)
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  mode = "L" if video.shape[-1] == 1 else "RGB"
  frames = [Image.fromarray(f[..., 0] if mode == "L" else f, mode) for f in video]
  _makedirs_for(path)
  duration = max(1, round(100.0 / fps)) * 10
  # disposal=1 keeps each frame whole; optimize=False stops Pillow from merging equal frames.
  frames[0].save(
    path,
    format="GIF",
    save_all=True,
    append_images=frames[1:],
    duration=duration,
    loop=loop,
    optimize=False,
    disposal=1,
  )
  return path


def mp4_codec() -> str | None:
  """The first available MP4 encoder of `MP4_CODECS`, or None (also when PyAV is missing)."""
  try:
    import av
  except ImportError:
    return None
  available = av.codecs_available
  return next((c for c in MP4_CODECS if c in available), None)


def write_mp4(
  path: str, video: np.ndarray, fps: float = 8.0, codec: str | None = None, quality: int = 18
) -> bool:
  """Writes ``video`` uint8 [T, H, W, C] as an MP4 file with PyAV.

  Frames are converted to yuv420p, which needs even sizes: odd heights/widths are padded by
  repeating the last row/column. Grey videos are written as RGB.

  Args:
    codec: an encoder name (raises ValueError when PyAV lacks it); None picks `mp4_codec()`.
    quality: libx264 CRF (0 lossless ... 51 worst); mpeg4 gets the equivalent qscale.

  Returns:
    True when written; False (with a warning logged, nothing written) when PyAV or both
    encoders are missing and `codec` is None.
  """
  video = _check_video(video)
  chosen = codec or mp4_codec()
  if chosen is None:
    logging.warning("write_mp4: PyAV with libx264 or mpeg4 is not available; %s not written", path)
    return False
  import av  # noqa: PLC0415 (optional dependency)

  if chosen not in av.codecs_available:
    raise ValueError(
      f"PyAV has no encoder {chosen!r}; available MP4 encoders: "
      f"{[c for c in MP4_CODECS if c in av.codecs_available]}"
    )
  if video.shape[-1] == 1:
    video = np.repeat(video, 3, axis=-1)
  t, h, w, _ = video.shape
  video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  _makedirs_for(path)
  rate = Fraction(fps).limit_denominator(1001)
  with av.open(path, mode="w", format="mp4") as container:
    stream = container.add_stream(chosen, rate=rate)
    stream.width, stream.height = video.shape[2], video.shape[1]
    stream.pix_fmt = "yuv420p"
    if chosen == "libx264":
      stream.options = {"crf": str(int(quality))}
    else:
      # Fixed quantiser: the QSCALE flag plus global_quality = q * FF_QP2LAMBDA (118).
      stream.codec_context.qscale = True
      stream.codec_context.global_quality = max(1, min(31, 1 + int(quality) // 6)) * 118
    for frame in video:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return True


def video_grid(videos: np.ndarray, ncol: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles videos frame by frame.

  Args:
    videos: uint8 [N, T, H, W, C].
    ncol: videos per grid row; rows = ceil(N / ncol). Empty cells keep `pad_value`.
    pad: pixels of `pad_value` around and between tiles.

  Returns:
    uint8 [T, rows * (H + pad) + pad, ncol * (W + pad) + pad, C]; video i sits at row i // ncol,
    column i % ncol.
  """
  videos = _check_video(videos, ndim=5)
  if ncol < 1:
    raise ValueError(f"ncol must be >= 1, got {ncol}")
  n, t, h, w, c = videos.shape
  rows = -(-n // ncol)
  grid = np.full((t, rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[:, y : y + h, x : x + w] = videos[i]
  return grid


def contact_sheet(
  videos: np.ndarray,
  max_frames: int | None = None,
  frame_step: int = 1,
  pad: int = 2,
  pad_value: int = 255,
) -> np.ndarray:
  """One image with a row per video and its frames left to right (PNG-able).

  Args:
    videos: uint8 [N, T, H, W, C] (a single [T, H, W, C] video is taken as N = 1).
    max_frames: keep at most this many frames per row (after `frame_step`).
    frame_step: show every `frame_step`-th frame, starting with the first.

  Returns:
    uint8 [N * (H + pad) + pad, F * (W + pad) + pad, C] with F the number of frames shown.
  """
  videos = np.asarray(videos)
  if videos.ndim == 4:
    videos = videos[None]
  videos = _check_video(videos, ndim=5)[:, ::frame_step]
  if max_frames is not None:
    videos = videos[:, :max_frames]
  n, f, h, w, c = videos.shape
  # A contact sheet is the single-frame grid of the frames of all videos, f per row.
  frames = videos.reshape(n * f, 1, h, w, c)
  return video_grid(frames, ncol=f, pad=pad, pad_value=pad_value)[0]


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> str:
  """Saves uint8 [H, W, C] (C in 1, 3) as PNG, optionally upscaled by pixel repetition."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [H, W, C] with C in (1, 3), got {image.dtype} {image.shape}")
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  _makedirs_for(path)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  return path
