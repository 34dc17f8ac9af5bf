"""Video-file folders on real clips (tests/fixtures/video, see make_video_fixtures.py)."""

import os
import pickle
import shutil

import numpy as np
import pytest

import av  # noqa: F401  (the tests need PyAV: requirements.txt)

from dfm_jax.data import video_files as vf  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "video")
CARPHONE = os.path.join(FIXTURES, "carphone", "carphone_distorted.mp4")
WEBM = os.path.join(FIXTURES, "carphone", "carphone_pristine_20f.webm")
GIF = os.path.join(FIXTURES, "digits", "moving_digits.gif")


def _decode_all(path):
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_find_files_and_labels():
  paths, labels, classes = vf.find_video_files(FIXTURES)
  assert classes == ["bikes", "carphone", "digits"]
  names = [os.path.relpath(p, FIXTURES) for p in paths]
  assert names == [
    "bikes/bikes_24f.mp4",
    "carphone/carphone_distorted.mp4",
    "carphone/carphone_pristine_20f.webm",
    "digits/moving_digits.gif",
  ]
  np.testing.assert_array_equal(labels, [0, 1, 1, 2])


def test_frame_counts_of_real_files():
  assert vf.count_frames(CARPHONE) == 120
  assert vf.count_frames(WEBM) == 20
  assert vf.count_frames(os.path.join(FIXTURES, "bikes", "bikes_24f.mp4")) == 24
  # The GIF stores 11 frames (two equal frames merged into one of double delay): 12 at 8 fps.
  assert vf.count_frames(GIF) == 12


def test_decode_frames_start_and_stride():
  full = _decode_all(CARPHONE)
  assert full.shape == (120, 144, 176, 3)
  clip = vf.decode_frames(CARPHONE, start=7, count=5, stride=3)
  np.testing.assert_array_equal(clip, full[7:20:3])
  grey = vf.decode_frames(WEBM, start=0, count=2, channels=1)
  assert grey.shape == (2, 144, 176, 1)
  with pytest.raises(ValueError, match="carphone_distorted.mp4: has 120 frames"):
    vf.decode_frames(CARPHONE, start=100, count=8, stride=3)


def test_gif_round_trip_is_exact():
  from dfm_jax.data.moving_digits import MovingDigits

  written = MovingDigits(1, frames=12, resolution=64, seed=0)[0]["video"]
  np.testing.assert_array_equal(vf.decode_frames(GIF, 0, 12, channels=1), written)


def test_resize_center_crop():
  video = np.zeros((2, 20, 40, 3), np.uint8)
  video[:, :, 10:30] = 200  # the middle half of the width
  out = vf.resize_center_crop(video, 10)
  assert out.shape == (2, 10, 10, 3)
  # The crop is the middle square (bicubic may overshoot a little at the edges).
  np.testing.assert_allclose(out[:, :, 1:-1], 200, atol=4)
  tall = vf.resize_center_crop(np.zeros((1, 30, 15, 1), np.uint8), 15)
  assert tall.shape == (1, 15, 15, 1)


def test_random_horizontal_flip():
  video = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
  rng = np.random.default_rng(0)
  outs = [vf.random_horizontal_flip(video, rng) for _ in range(40)]
  flipped = [np.array_equal(o, video[:, :, ::-1]) for o in outs]
  kept = [np.array_equal(o, video) for o in outs]
  assert all(f or k for f, k in zip(flipped, kept)) and 5 < sum(flipped) < 35
  assert np.array_equal(vf.random_horizontal_flip(video, rng, p=1.0), video[:, :, ::-1])


def test_video_folder_clips():
  ds = vf.VideoFolder(FIXTURES, frames=6, resolution=32, frame_stride=2)
  assert ds.frame_counts == [24, 120, 20, 12]
  # span 11: 2 + 10 + 1 + 1 non-overlapping clips
  assert len(ds) == 14
  assert ds.clip_location(0) == (0, 0) and ds.clip_location(1) == (0, 11)
  assert ds.clip_location(2) == (1, 0) and ds.clip_location(11) == (1, 99)
  assert ds.clip_location(-1) == (3, 0)
  with pytest.raises(IndexError):
    ds.clip_location(14)
  item = ds[2]
  assert item["video"].shape == (6, 32, 32, 3) and item["video"].dtype == np.uint8
  assert item["label"] == 1 and item["label"].dtype == np.int32
  expected = vf.resize_center_crop(_decode_all(CARPHONE)[0:11:2], 32)
  np.testing.assert_array_equal(item["video"], expected)
  assert ds[-1]["label"] == 2
  overlapping = vf.VideoFolder(FIXTURES, frames=4, resolution=16, clip_step=4, channels=1)
  assert len(overlapping) == 6 + 30 + 5 + 3 and overlapping[0]["video"].shape == (4, 16, 16, 1)
  # Picklable for multiprocess loaders, and a Grain source.
  clone = pickle.loads(pickle.dumps(ds))
  np.testing.assert_array_equal(clone[13]["video"], ds[13]["video"])
  import grain

  source = grain.MapDataset.source(ds)
  assert len(source) == 14 and source[5]["label"] == 1


@pytest.fixture
def bad_folder(tmp_path):
  root = tmp_path / "videos"
  (root / "good").mkdir(parents=True)
  (root / "bad").mkdir()
  shutil.copy(CARPHONE, root / "good" / "a.mp4")
  data = open(CARPHONE, "rb").read()
  (root / "bad" / "truncated.mp4").write_bytes(data[: len(data) // 2])
  (root / "bad" / "garbage.webm").write_bytes(b"not a video" * 50)
  (root / "bad" / "empty.gif").write_bytes(b"")
  return root


def test_corrupt_files(bad_folder, caplog):
  with pytest.raises(ValueError, match=r"(truncated\.mp4|garbage\.webm|empty\.gif)"):
    vf.VideoFolder(str(bad_folder), frames=4, resolution=16)
  for name in ("truncated.mp4", "garbage.webm", "empty.gif"):
    with pytest.raises(ValueError, match=name):
      vf.count_frames(str(bad_folder / "bad" / name))
  with caplog.at_level("WARNING"):
    ds = vf.VideoFolder(str(bad_folder), frames=4, resolution=16, skip_corrupt=True)
  assert [os.path.basename(p) for p, _ in ds.skipped] == [
    "empty.gif",
    "garbage.webm",
    "truncated.mp4",
  ]
  assert "skipping" in caplog.text and "garbage.webm" in caplog.text
  assert ds.paths == [str(bad_folder / "good" / "a.mp4")] and ds.labels == [1]
  assert len(ds) == 30 and ds[0]["label"] == 1


def test_too_short_file(tmp_path, caplog):
  from dfm_jax import video_io

  assert video_io.mp4_codec() is not None, "PyAV from requirements.txt encodes MP4"
  root = tmp_path / "videos"
  (root / "a").mkdir(parents=True)
  shutil.copy(WEBM, root / "a" / "long.webm")
  assert video_io.write_mp4(str(root / "a" / "short.mp4"), np.zeros((3, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match=r"short\.mp4: too short, 3 frames < 7"):
    vf.VideoFolder(str(root), frames=4, resolution=16, frame_stride=2)
  with caplog.at_level("WARNING"):
    ds = vf.VideoFolder(str(root), frames=4, resolution=16, frame_stride=2, skip_corrupt=True)
  assert len(ds.skipped) == 1 and "short.mp4" in caplog.text
  assert len(ds) == 2  # 20 frames, span 7


def test_empty_folder(tmp_path):
  with pytest.raises(FileNotFoundError):
    vf.find_video_files(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    vf.find_video_files(str(tmp_path / "missing"))
