"""Writing sample videos: GIF round trip, MP4 via PyAV, grid and contact-sheet layouts."""

import numpy as np
import pytest
from PIL import Image, ImageSequence

from dfm_jax import video_io


def _video(t=5, h=12, w=10, c=1, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (t, h, w, c), dtype=np.uint8)


def test_gif_round_trip_grey_exact(tmp_path):
  video = _video()
  path = video_io.write_gif(str(tmp_path / "sub" / "v.gif"), video, fps=10)
  with Image.open(path) as im:
    assert im.n_frames == 5 and im.size == (10, 12)
    frames = [np.asarray(f.convert("L")) for f in ImageSequence.Iterator(im)]
    assert im.info["duration"] == 100 and im.info["loop"] == 0
  np.testing.assert_array_equal(np.stack(frames), video[..., 0])


def test_gif_round_trip_rgb(tmp_path):
  video = np.zeros((4, 8, 6, 3), np.uint8)
  video[:, :4, :, 0] = 255  # red top half, blue bottom half: exact in a palette
  video[:, 4:, :, 2] = 255
  for t in range(4):
    video[t, :, t, 1] = 255  # a green column moving right
  path = video_io.write_gif(str(tmp_path / "v.gif"), video, fps=4)
  with Image.open(path) as im:
    frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
  np.testing.assert_array_equal(frames, video)


def test_gif_identical_frames_keep_playback_time(tmp_path):
  video = _video(t=4)
  video[1] = video[0]
  path = video_io.write_gif(str(tmp_path / "v.gif"), video, fps=10)
  with Image.open(path) as im:
    durations = [f.info["duration"] for f in ImageSequence.Iterator(im)]
  assert durations == [200, 100, 100]


def test_write_gif_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError):
    video_io.write_gif(str(tmp_path / "v.gif"), np.zeros((3, 4, 4, 2), np.uint8))
  with pytest.raises(ValueError):
    video_io.write_gif(str(tmp_path / "v.gif"), np.zeros((3, 4, 4, 1), np.float32))


def test_write_mp4(tmp_path):
  import av

  codec = video_io.mp4_codec()
  assert codec is not None, "PyAV from requirements.txt encodes MP4"
  video = np.zeros((6, 15, 17, 1), np.uint8)
  for t in range(6):
    video[t, 2:9, 2 + 2 * t : 6 + 2 * t] = 255
  path = str(tmp_path / "v.mp4")
  assert video_io.write_mp4(path, video, fps=6)
  with av.open(path) as container:
    stream = container.streams.video[0]
    assert (stream.width, stream.height) == (18, 16)  # padded to even sizes
    frames = np.stack([f.to_ndarray(format="gray") for f in container.decode(stream)])
  assert frames.shape == (6, 16, 18)
  assert np.abs(frames[:, :15, :17].astype(int) - video[..., 0]).mean() < 8
  with pytest.raises(ValueError, match="no encoder"):
    video_io.write_mp4(path, video, codec="no_such_codec")


def test_write_mp4_without_encoder(tmp_path, monkeypatch):
  monkeypatch.setattr(video_io, "mp4_codec", lambda: None)
  path = tmp_path / "v.mp4"
  assert video_io.write_mp4(str(path), _video(), fps=4) is False
  assert not path.exists()


def test_video_grid_layout():
  n, t, h, w = 5, 3, 4, 6
  videos = np.stack([np.full((t, h, w, 1), 10 * (i + 1), np.uint8) for i in range(n)])
  videos[:, :, 0, 0] += np.arange(t, dtype=np.uint8)[None, :, None]  # frame marker
  grid = video_io.video_grid(videos, ncol=2, pad=1, pad_value=0)
  assert grid.shape == (t, 3 * (h + 1) + 1, 2 * (w + 1) + 1, 1)
  for i in range(n):
    r, c = divmod(i, 2)
    y, x = 1 + r * (h + 1), 1 + c * (w + 1)
    np.testing.assert_array_equal(grid[:, y : y + h, x : x + w], videos[i])
  assert not grid[:, 1 + 2 * (h + 1) :, 1 + (w + 1) :].any()  # empty sixth cell
  assert not grid[:, 0].any() and not grid[:, :, 0].any()  # border


def test_contact_sheet_layout(tmp_path):
  videos = np.zeros((2, 6, 4, 5, 3), np.uint8)
  for i in range(2):
    for t in range(6):
      videos[i, t] = 20 * t + i
  sheet = video_io.contact_sheet(videos, frame_step=2, max_frames=2, pad=1)
  assert sheet.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
  for i in range(2):
    for j, t in enumerate((0, 2)):
      y, x = 1 + i * 5, 1 + j * 6
      assert np.all(sheet[y : y + 4, x : x + 5] == 20 * t + i)
  single = video_io.contact_sheet(videos[0], pad=0)
  assert single.shape == (4, 6 * 5, 3)
  path = video_io.save_png(str(tmp_path / "sheet.png"), sheet, upscale=2)
  with Image.open(path) as im:
    assert im.size == (2 * sheet.shape[1], 2 * sheet.shape[0])
