"""Video data end to end without training: the moving_digits and video_folder sources through
the shared pipeline (shapes [B, T, H, W, C], flips of the width axis, scaling to [-1, 1]), the
[T, H, W, C] sample shape, the video outputs of sampling.py and the video metric switches."""

import os

import numpy as np
import pytest
from PIL import Image

from dfm_jax import data as data_lib
from dfm_jax import experiment, sampling, video_io
from dfm_jax.config_defaults import base_config
from dfm_jax.evaluation import scores


def _digits_data(**extra):
  d = data_lib.default_data_config()
  d.source = "moving_digits"
  d.frames = 6
  d.resolution = 32
  d.num_videos = 50
  for k, v in extra.items():
    d[k] = v
  return d


def test_moving_digits_batches_have_video_shape_and_range():
  d = _digits_data()
  it = data_lib.make_train_iterator(d, global_batch_size=4, seed=0)
  batch = next(it)
  assert batch["image"].shape == (4, 6, 32, 32, 1)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


def test_moving_digits_is_deterministic_and_flips_whole_clips():
  plain = data_lib.open_source(_digits_data())
  again = data_lib.open_source(_digits_data())
  np.testing.assert_array_equal(plain[7]["image"], again[7]["image"])
  it = data_lib.make_train_iterator(
    _digits_data(random_flip=True, num_videos=8), global_batch_size=8, seed=3
  )
  ref = data_lib.make_train_iterator(_digits_data(num_videos=8), global_batch_size=8, seed=3)
  flipped = unflipped = 0
  for _ in range(3):
    a, b = next(it)["image"], next(ref)["image"]
    for x, y in zip(a, b):
      if np.array_equal(x, y):
        unflipped += 1
      else:
        np.testing.assert_array_equal(x, y[:, :, ::-1])  # every frame mirrored left-right
        flipped += 1
  assert flipped and unflipped


def test_moving_digits_splits_and_channels():
  test = data_lib.open_source(_digits_data(), split="test")
  train = data_lib.open_source(_digits_data())
  assert not np.array_equal(test[0]["image"], train[0]["image"])
  rgb = data_lib.open_source(_digits_data(channels=3))
  assert rgb[0]["image"].shape == (6, 32, 32, 3)
  real, labels = data_lib.load_images(_digits_data(), 5, split="test", seed=1)
  assert real.shape == (5, 6, 32, 32, 1) and real.dtype == np.uint8 and labels.shape == (5,)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("frames", 0, "data.frames"),
    ("resolution", 20, "data.resolution"),
    ("num_videos", 0, "data.num_videos"),
    ("split", "val", "data.split"),
  ],
)
def test_moving_digits_bad_fields_are_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    data_lib.validate_data_config(_digits_data(**{field: value}))


def _config(**data):
  c = base_config()
  for k, v in data.items():
    c.data[k] = v
  c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
  return c


def test_sample_shape_is_t_h_w_c_for_videos():
  exp = experiment.from_config(_config(source="moving_digits", frames=4), check_data=True)
  assert exp.sample_shape == (4, 32, 32, 1)
  assert exp.model.stage_shapes == ((4, 16, 16, 1), (4, 32, 32, 1))
  assert experiment.from_config(_config(), check_data=False).sample_shape == (32, 32, 1)
  with pytest.raises(ValueError, match="data.frames"):
    experiment.from_config(_config(source="moving_digits"), check_data=False)
  with pytest.raises(ValueError, match="holds images"):
    experiment.from_config(_config(frames=4), check_data=False)


def _write_video_folder(root, num_frames=(6, 6, 2)):
  rng = np.random.default_rng(0)
  for i, (cls, n) in enumerate(zip(("a", "b", "b"), num_frames)):
    video = rng.integers(0, 255, (n, 24, 30, 3), dtype=np.uint8)
    video_io.write_gif(os.path.join(root, cls, f"clip{i}.gif"), video)
  return root


def test_video_folder_source(tmp_path):
  root = _write_video_folder(str(tmp_path / "videos"), (6, 6, 6))
  d = data_lib.default_data_config()
  d.update(
    dict(source="video_folder", path=root, frames=3, resolution=16, channels=3, random_flip=True)
  )
  it = data_lib.make_train_iterator(d, global_batch_size=2, seed=0)
  assert next(it)["image"].shape == (2, 3, 16, 16, 3)
  assert data_lib.dataset_size(d) == 6  # 2 clips of 3 frames per file


def test_video_folder_too_short_or_corrupt_is_named_or_skipped(tmp_path):
  root = _write_video_folder(str(tmp_path / "videos"))
  with open(os.path.join(root, "a", "broken.gif"), "wb") as f:
    f.write(b"GIF89a not really")
  d = data_lib.default_data_config()
  d.update(dict(source="video_folder", path=root, frames=4, resolution=16, channels=1))
  with pytest.raises(ValueError, match=r"broken\.gif|clip2\.gif"):
    data_lib.dataset_size(d)
  d.skip_corrupt = True
  assert data_lib.dataset_size(d) == 2  # clip0 and clip1, one 4-frame clip each
  d.path = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="data.path"):
    data_lib.validate_data_config(d)


def test_video_sample_outputs(tmp_path):
  rng = np.random.default_rng(0)
  videos = rng.integers(0, 255, (5, 4, 8, 8, 1), dtype=np.uint8)
  sheet = sampling.write_video_grid(str(tmp_path / "s"), videos, ncol=3)
  assert sheet.shape == (5 * 10 + 2, 4 * 10 + 2, 3)
  with Image.open(tmp_path / "s.gif") as gif:
    assert gif.n_frames == 4 and gif.size == (3 * 10 + 2, 2 * 10 + 2)
  assert (tmp_path / "s.mp4").is_file() == (video_io.mp4_codec() is not None)
  previews = rng.integers(0, 255, (2, 3, 4, 8, 8, 1), dtype=np.uint8)
  sheet = sampling.write_video_preview_grid(str(tmp_path / "p"), previews)
  assert sheet.shape == (6 * 10 + 2, 4 * 10 + 2, 3)
  assert (tmp_path / "p.gif").is_file() and not (tmp_path / "p.mp4").exists()


def test_video_metrics_replace_image_metrics():
  video = _config(source="moving_digits", frames=4)
  video.eval.metrics = ("fid", "kid", "is", "classifier", "frame_fid", "motion", "fvd")
  video.eval.classifier = "mnist5k"
  names = [type(m).__name__ for m in scores.active_metrics(video)]
  assert names == ["FrameFID", "MotionScores"]  # fvd needs eval.i3d_weights
  video.eval.i3d_weights = "/nonexistent/i3d_pretrained_400.pt"
  assert "FVD" in [type(m).__name__ for m in scores.active_metrics(video)]
  assert any("eval.i3d_weights" in p for p in scores.check_metrics_config(video))
  image = _config()
  image.eval.metrics = ("fid", "frame_fid", "motion")
  assert [type(m).__name__ for m in scores.active_metrics(image)] == ["FID"]


def test_frame_and_fvd_clip_selection():
  v = np.arange(2 * 8).reshape(2, 8, 1, 1, 1).astype(np.uint8)
  frames = scores.video_frames(v, keep=3)
  assert frames.shape == (6, 1, 1, 1)
  np.testing.assert_array_equal(frames[:3, 0, 0, 0], [0, 4, 7])  # first, middle, last
  assert scores.video_frames(v, keep=0).shape == (16, 1, 1, 1)
  clips = scores.fvd_clips(v, 16)
  assert clips.shape == (2, 16, 1, 1, 1)
  np.testing.assert_array_equal(clips[0, :4, 0, 0, 0], [0, 0, 1, 1])
  long = np.zeros((1, 20, 1, 1, 1), np.uint8)
  assert scores.fvd_clips(long, 16).shape == (1, 16, 1, 1, 1)
