"""A folder of video files (mp4, webm, gif, ...) as random-access fixed-length clips, via PyAV.

Layout as torchvision's ``ImageFolder``: every subfolder of `root` is a class (sorted names ->
labels 0, 1, ...) and holds video files at any depth. Each file is cut into clips of `frames`
frames taken every `frame_stride` source frames, so a clip spans ``(frames - 1) * frame_stride
+ 1`` source frames; consecutive clips of a file start `clip_step` frames apart (default: the
span, i.e. non-overlapping). Clip ``i`` is located by ``clip_location(i) -> (path, start)``.

Frames are decoded with PyAV (the optional ``av`` package), resized so that the short side is
`resolution` (Pillow, bicubic, antialiased when shrinking) and centre-cropped to a square.
Elements are ``{'video': uint8 [T, R, R, C], 'label': int32 []}`` (C = 3, or 1 with
``channels=1``); `VideoFolder` implements Grain's ``RandomAccessDataSource`` protocol and is
picklable (files are opened per access). Random horizontal flipping is a separate transform,
`random_horizontal_flip`, applied to the whole clip.

Frame counts come from the demuxer (one packet per frame, no decoding) when the folder is
indexed; a file that cannot be opened, has no video stream or no frame, whose first frame does
not decode, or that is shorter than one clip raises a ValueError naming the file, or is skipped
with a warning (listed in ``VideoFolder.skipped``) when ``skip_corrupt=True``. Errors that only
show later in a file surface as a ValueError naming the file when that clip is read.

GIF frames carry their own delays and encoders merge identical consecutive frames into one
longer frame; GIF frames are therefore repeated ``round(delay / shortest delay)`` times, which
restores a constant frame rate (and exactly the frames written by ``video_io.write_gif``).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".avi", ".mov", ".mkv", ".m4v")

__all__ = [
  "VIDEO_EXTENSIONS",
  "VideoFolder",
  "find_video_files",
  "count_frames",
  "decode_frames",
  "resize_center_crop",
  "random_horizontal_flip",
]


def _av():
  try:
    import av
  except ImportError as e:
    raise ImportError("reading video files needs PyAV: pip install av") from e
  return av


def find_video_files(
  root: str, extensions: Sequence[str] = VIDEO_EXTENSIONS
) -> tuple[list[str], np.ndarray, list[str]]:
  """Video files under the class subfolders of `root`, as torchvision's ImageFolder.

  Returns:
    paths [N] (sorted within each class), labels int32 [N], class_names [K] (sorted).
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"video folder {root!r} does not exist")
  exts = tuple(e.lower() for e in extensions)
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  paths, labels = [], []
  for label, name in enumerate(classes):
    found = []
    for dirpath, _, files in os.walk(os.path.join(root, name), followlinks=True):
      found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(exts)]
    paths += sorted(found)
    labels += [label] * len(found)
  if not paths:
    raise FileNotFoundError(f"no {'/'.join(exts)} files in the class subfolders of {root!r}")
  return paths, np.asarray(labels, np.int32), classes


def _gif_repeats(durations: Sequence[int]) -> np.ndarray:
  """Per-frame repeat counts [F] that turn variable GIF delays into a constant frame rate."""
  d = np.asarray([max(int(x or 0), 0) for x in durations], np.float64)
  if not len(d) or d.max() <= 0:
    return np.ones(len(d), np.int64)
  base = d[d > 0].min()
  return np.maximum(1, np.rint(d / base)).astype(np.int64)


def _is_gif(container) -> bool:
  return "gif" in container.format.name.split(",")


def _probe(path: str) -> tuple[int, np.ndarray | None]:
  """(number of frames, GIF repeat counts or None); raises ValueError naming `path`."""
  av = _av()
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
      stream = container.streams.video[0]
      durations = [p.duration for p in container.demux(stream) if p.size]
    if not durations:
      raise ValueError(f"{path}: no video frames")
    with av.open(path) as container:  # the first frame must decode
      next(container.decode(video=0))
      gif = _is_gif(container)
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: cannot decode video ({e})") from e
  except StopIteration:
    raise ValueError(f"{path}: no decodable video frame") from None
  if gif:
    repeats = _gif_repeats(durations)
    return int(repeats.sum()), repeats
  return len(durations), None


def count_frames(path: str) -> int:
  """Number of frames of the first video stream of `path` (GIF: at a constant frame rate)."""
  return _probe(path)[0]


def decode_frames(
  path: str, start: int, count: int, stride: int = 1, channels: int = 3
) -> np.ndarray:
  """Frames ``start, start + stride, ...`` (`count` of them) of `path`.

  Returns:
    uint8 [count, H, W, channels] (channels 3: RGB, 1: grey).
  Raises:
    ValueError naming the file when it cannot be decoded or has too few frames.
  """
  av = _av()
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  wanted = start + np.arange(count) * stride
  last = int(wanted[-1]) if count else -1
  fmt = "gray" if channels == 1 else "rgb24"
  out, index = [], 0
  try:
    with av.open(path) as container:
      stream = container.streams.video[0]
      gif = _is_gif(container)
      if gif:
        durations = [p.duration for p in container.demux(stream) if p.size]
        repeats = _gif_repeats(durations)
        container.seek(0)
      for i, frame in enumerate(container.decode(stream)):
        n = int(repeats[i]) if gif and i < len(repeats) else 1
        hits = np.count_nonzero((wanted >= index) & (wanted < index + n))
        if hits:
          array = frame.to_ndarray(format=fmt)
          out += [array] * hits
        index += n
        if index > last:
          break
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: cannot decode video ({e})") from e
  if len(out) < count:
    raise ValueError(
      f"{path}: has {index} frames, a clip needs frames {start}..{last} (stride {stride})"
    )
  video = np.stack(out) if out else np.zeros((0, 0, 0), np.uint8)
  return video[..., None] if channels == 1 else video


def resize_center_crop(video: np.ndarray, resolution: int) -> np.ndarray:
  """Resizes ``video`` uint8 [T, H, W, C] to short side `resolution`, then centre-crops.

  Pillow bicubic (antialiased when shrinking); the long side becomes
  ``round(long * resolution / short)`` and the crop keeps the middle (offset rounded down).

  Returns:
    uint8 [T, resolution, resolution, C].
  """
  video = np.asarray(video)
  t, h, w, c = video.shape
  scale = resolution / min(h, w)
  nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
  top, left = (nh - resolution) // 2, (nw - resolution) // 2
  out = np.empty((t, resolution, resolution, c), np.uint8)
  for i, frame in enumerate(video):
    img = Image.fromarray(frame[..., 0] if c == 1 else frame)
    if (nh, nw) != (h, w):
      img = img.resize((nw, nh), Image.BICUBIC)
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img)
    out[i] = array[..., None] if c == 1 else array
  return out


def random_horizontal_flip(
  video: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> np.ndarray:
  """Mirrors the whole clip ``video`` [T, H, W, C] left-right with probability `p`."""
  return np.ascontiguousarray(video[:, :, ::-1]) if rng.random() < p else video


class VideoFolder:
  """Random-access fixed-length clips from a folder of videos with class subfolders.

  Args:
    root: folder whose subfolders are the classes.
    frames: T, frames per clip.
    resolution: R, output height and width.
    frame_stride: take every `frame_stride`-th source frame.
    clip_step: distance in source frames between the starts of consecutive clips of a file;
      None -> the clip span (non-overlapping clips).
    channels: 3 (RGB) or 1 (grey).
    skip_corrupt: skip unreadable or too-short files with a warning instead of raising.
    extensions: file endings that count as videos (case-insensitive).
  """

  def __init__(
    self,
    root: str,
    frames: int,
    resolution: int,
    frame_stride: int = 1,
    clip_step: int | None = None,
    channels: int = 3,
    skip_corrupt: bool = False,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
  ):
    if (
      frames < 1 or resolution < 1 or frame_stride < 1 or (clip_step is not None and clip_step < 1)
    ):
      raise ValueError("frames, resolution, frame_stride and clip_step must be >= 1")
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {channels}")
    self.root = root
    self.frames, self.resolution, self.frame_stride = int(frames), int(resolution), frame_stride
    self.span = (self.frames - 1) * frame_stride + 1
    self.clip_step = int(clip_step or self.span)
    self.channels = channels
    paths, labels, self.class_names = find_video_files(root, extensions)
    self.paths: list[str] = []
    self.labels: list[int] = []
    self.frame_counts: list[int] = []
    self.skipped: list[tuple[str, str]] = []
    for path, label in zip(paths, labels):
      try:
        n = count_frames(path)
        if n < self.span:
          raise ValueError(
            f"{path}: too short, {n} frames < {self.span} for one clip of "
            f"{self.frames} frames at stride {frame_stride}"
          )
      except ValueError as e:
        if not skip_corrupt:
          raise
        logging.warning("VideoFolder: skipping %s", e)
        self.skipped.append((path, str(e)))
        continue
      self.paths.append(path)
      self.labels.append(int(label))
      self.frame_counts.append(n)
    clips = [(n - self.span) // self.clip_step + 1 for n in self.frame_counts]
    self._offsets = np.concatenate([[0], np.cumsum(clips, dtype=np.int64)]).tolist()

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __repr__(self) -> str:
    return (
      f"VideoFolder({self.root!r}, frames={self.frames}, resolution={self.resolution}, "
      f"frame_stride={self.frame_stride}: {len(self.paths)} files, {len(self)} clips, "
      f"{len(self.skipped)} skipped)"
    )

  def clip_location(self, index: int) -> tuple[int, int]:
    """(file number into ``paths``, first source frame) of clip `index`."""
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"clip {index} out of range for {len(self)} clips")
    f = bisect.bisect_right(self._offsets, index) - 1
    return f, (index - self._offsets[f]) * self.clip_step

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Clip `index`: ``{'video': uint8 [T, R, R, C], 'label': int32 []}``."""
    f, start = self.clip_location(index)
    frames = decode_frames(self.paths[f], start, self.frames, self.frame_stride, self.channels)
    video = resize_center_crop(frames, self.resolution)
    return {"video": video, "label": np.int32(self.labels[f])}
