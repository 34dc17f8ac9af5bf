"""Sources, pixel transforms and config validation of dfm_jax.data, against expectations built
independently here (hand-written idx/PNG/npz files, PIL as the colour reference)."""

import csv
import gzip
import io
import os
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dfm_jax import data as D
from dfm_jax.data import transforms


def cfg(**overrides):
  c = D.default_data_config()
  c.update(overrides)
  return c


def write_idx(path, array, gz):
  """Writes the idx format by hand: 0, 0, type code, ndim, big-endian dims, big-endian data."""
  codes = {np.uint8: 0x08, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
  code = codes[array.dtype.type]
  raw = struct.pack(">BBBB", 0, 0, code, array.ndim)
  raw += struct.pack(f">{array.ndim}I", *array.shape)
  raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(raw)


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------- transforms


def test_center_crop_takes_the_central_window_after_box_halving():
  # 128x192 image whose R channel is x // 4 and G channel y // 4: two box halvings to 32x48
  # turn every 4x4 block into one pixel of value (x, y) exactly; the centre 32x32 window of
  # the 48-wide image starts at column 8.
  y, x = np.mgrid[:128, :192]
  img = np.stack([x // 4, y // 4, np.zeros_like(x)], -1).astype(np.uint8)
  out = D.center_crop(img, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], np.broadcast_to(np.arange(8, 40), (32, 32)))
  np.testing.assert_array_equal(out[..., 1], np.broadcast_to(np.arange(32)[:, None], (32, 32)))


def test_center_crop_resizes_short_side_and_keeps_constant_images_constant():
  img = np.full((40, 70, 1), 77, np.uint8)  # short side 40 -> 32 (bicubic), long 70 -> 56
  out = D.center_crop(img, 32)
  assert out.shape == (32, 32, 1)
  np.testing.assert_array_equal(out, 77)
  # Tall image: the window is centred vertically.
  y = np.repeat(np.arange(48, dtype=np.uint8)[:, None], 32, 1)[..., None]
  np.testing.assert_array_equal(D.center_crop(y, 32)[:, 0, 0], np.arange(8, 40))


def test_pad_places_28x28_in_the_centre_of_32x32():
  rng = np.random.default_rng(0)
  img = rng.integers(1, 256, (28, 28, 1), dtype=np.uint8)
  out = D.pad_to(img, 32)
  assert out.shape == (32, 32, 1)
  np.testing.assert_array_equal(out[2:30, 2:30], img)
  assert out.sum() == img.astype(np.int64).sum()  # the 2-pixel border is black
  odd = D.pad_to(np.ones((27, 30, 3), np.uint8), 32)
  assert odd[2:29, 1:31].all() and odd.sum() == 27 * 30 * 3
  with pytest.raises(ValueError, match="no larger than"):
    D.pad_to(np.ones((33, 20, 1), np.uint8), 32)


def test_rgb_to_gray_matches_pil_and_unit_range_endpoints():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  expected = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
  np.testing.assert_array_equal(transforms.to_channels(rgb, 1), expected)
  np.testing.assert_array_equal(transforms.to_channels(expected, 3), np.repeat(expected, 3, -1))
  scaled = transforms.to_unit_range(np.array([0, 255], np.uint8))
  assert scaled.dtype == np.float32 and scaled.tolist() == [-1.0, 1.0]


# ---------------------------------------------------------------------------- idx / mnist5k


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
  labels = rng.integers(0, 10, 7).astype(np.uint8)
  suffix = ".gz" if gz else ""
  img_path = str(tmp_path / f"train-images-idx3-ubyte{suffix}")
  write_idx(img_path, images, gz)
  write_idx(str(tmp_path / f"train-labels-idx1-ubyte{suffix}"), labels, gz)
  np.testing.assert_array_equal(D.load_idx(img_path), images)
  wide = rng.normal(size=(3, 2)).astype(np.float32)
  write_idx(str(tmp_path / "f.idx"), wide, gz)
  np.testing.assert_array_equal(D.load_idx(str(tmp_path / "f.idx")), wide)
  shorts = np.array([-300, 7, 30000], np.int16)
  write_idx(str(tmp_path / "s.idx"), shorts, gz)
  np.testing.assert_array_equal(D.load_idx(str(tmp_path / "s.idx")), shorts)

  got_images, got_labels = D.load_idx_dataset(img_path)  # label file derived from the name
  np.testing.assert_array_equal(got_images[..., 0], images)
  np.testing.assert_array_equal(got_labels, labels)
  assert got_labels.dtype == np.int32

  c = cfg(source="idx", path=img_path, resolution=8, crop="pad")
  assert D.dataset_size(c) == 7
  padded, lab = D.load_images(c, 7, seed=3)
  order = np.random.default_rng(3).permutation(7)
  np.testing.assert_array_equal(padded[:, 1:6, 1:7, 0], images[order])
  np.testing.assert_array_equal(lab, labels[order])


def test_idx_rejects_truncated_data(tmp_path):
  path = str(tmp_path / "x-images-idx3-ubyte")
  write_idx(path, np.zeros((4, 3, 3), np.uint8), False)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1)
  with pytest.raises(ValueError, match="idx data holds"):
    D.load_idx(path)


def test_mnist5k_is_5000_digits_500_per_class_padded_to_32():
  c = cfg()
  assert D.dataset_size(c) == 5000
  images, labels = D.load_images(c, 5000)
  assert images.shape == (5000, 32, 32, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
  assert not images[:, :2].any() and not images[:, 30:].any()
  assert not images[:, :, :2].any() and not images[:, :, 30:].any()
  with gzip.open(D.mnist5k_path(), "rt") as f:
    rows = [list(map(int, r)) for r in csv.reader(f)]
  table = np.array(rows)
  order = np.random.default_rng(0).permutation(5000)
  np.testing.assert_array_equal(images[:, 2:30, 2:30, 0], table[order, :784].reshape(-1, 28, 28))
  np.testing.assert_array_equal(labels, table[order, 784])


# ---------------------------------------------------------------------------- folders


def test_folder_labels_follow_sorted_class_folders(tmp_path):
  # Class i is coloured 40*i; names are created out of order and one class is nested.
  names = ["zebra", "ant", "moose"]
  for name in names:
    value = 40 * sorted(names).index(name)
    for k in range(3):
      sub = "deep/" if name == "moose" and k == 2 else ""
      write_png(str(tmp_path / name / f"{sub}{k}.png"), np.full((10, 12, 3), value, np.uint8))
  (tmp_path / "ant" / "notes.txt").write_text("not an image")
  c = cfg(
    source="folder", path=str(tmp_path), resolution=8, channels=3, crop="center", num_classes=3
  )
  assert D.dataset_size(c) == 9
  images, labels = D.load_images(c, 9)
  assert images.shape == (9, 8, 8, 3)
  np.testing.assert_array_equal(np.sort(labels), [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(images[:, 0, 0, 0], 40 * labels)
  with pytest.raises(ValueError, match="num_classes"):
    D.validate_data_config(cfg(**{**c.to_dict(), "num_classes": 2}))


def test_flat_folder_is_label_0_and_gray_conversion_matches_pil(tmp_path):
  rng = np.random.default_rng(4)
  rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  write_png(str(tmp_path / "a.png"), rgb)
  write_png(str(tmp_path / "b.png"), rgb[::-1])
  images, labels = D.load_images(cfg(source="folder", path=str(tmp_path), resolution=8), 2)
  assert labels.tolist() == [0, 0]
  expected = np.asarray(Image.fromarray(rgb).convert("L"))
  assert any(np.array_equal(im[..., 0], expected) for im in images)


def test_folder_mixing_loose_images_and_class_folders_is_rejected(tmp_path):
  write_png(str(tmp_path / "loose.png"), np.zeros((4, 4, 3), np.uint8))
  write_png(str(tmp_path / "cls" / "a.png"), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="data.path: .*mixes class subfolders"):
    D.validate_data_config(cfg(source="folder", path=str(tmp_path)))


def _folder_with_truncated_png(root):
  for k in range(4):
    write_png(os.path.join(root, f"{k}.png"), np.full((6, 6), 50 * (k + 1), np.uint8))
  buf = io.BytesIO()
  noise = np.random.default_rng(6).integers(0, 256, (6, 6), dtype=np.uint8)
  Image.fromarray(noise).save(buf, "PNG")
  bad = os.path.join(root, "2_bad.png")
  with open(bad, "wb") as f:
    f.write(buf.getvalue()[:60])  # header intact, image data cut short
  return bad


def test_corrupt_png_error_names_the_file(tmp_path):
  _folder_with_truncated_png(str(tmp_path))
  c = cfg(source="folder", path=str(tmp_path), resolution=8)
  with pytest.raises(D.CorruptRecordError, match=r"2_bad\.png"):
    D.load_images(c, 5)


def test_corrupt_png_is_skipped_and_counted(tmp_path):
  bad = _folder_with_truncated_png(str(tmp_path))
  c = cfg(source="folder", path=str(tmp_path), resolution=8, skip_corrupt=True)
  before = D.skipped_records().get(bad, 0)
  images, _ = D.load_images(c, 5)
  assert images.shape == (5, 8, 8, 1)
  assert D.skipped_records()[bad] == before + 1
  # Sorted order is 0, 1, 2, 2_bad, 3: the bad file is replaced by its successor 3.png.
  assert sorted(images[:, 4, 4, 0].tolist()) == [50, 100, 150, 200, 200]
  it = D.make_train_iterator(c, global_batch_size=5, seed=0)
  for _ in range(3):
    assert next(it)["image"].shape == (5, 8, 8, 1)


# ---------------------------------------------------------------------------- latents


def test_latents_are_scaled_not_clipped_and_have_no_pixels(tmp_path):
  rng = np.random.default_rng(5)
  latents = (rng.normal(size=(6, 4, 4, 3)) * 3).astype(np.float16)
  labels = np.arange(6) % 2
  path = str(tmp_path / "lat.npz")
  np.savez(path, latents=latents, labels=labels)
  c = cfg(source="latents", path=path, latent_scale=0.5, num_classes=2)
  batch = next(D.make_train_iterator(c, global_batch_size=6, seed=1))
  assert batch["image"].shape == (6, 4, 4, 3) and batch["image"].dtype == np.float32
  expected = {latents[i].astype(np.float32).tobytes(): labels[i] for i in range(6)}
  for image, label in zip(batch["image"], batch["label"]):
    assert expected[(image / np.float32(0.5)).tobytes()] == label
  assert np.abs(batch["image"]).max() > 1  # no clipping to [-1, 1]
  with pytest.raises(ValueError, match="FID"):
    D.load_images(c, 2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ">f4"])
@pytest.mark.parametrize("fortran", [False, True])
def test_stored_npz_members_are_memory_mapped_exactly(tmp_path, dtype, fortran):
  rng = np.random.default_rng(6)
  latents = rng.normal(size=(5, 3, 4, 2)).astype(dtype)
  if fortran:
    latents = np.asfortranarray(latents)
  path = str(tmp_path / "lat.npz")
  # a long first member name and a second array make the offsets non-trivial
  np.savez(path, a_long_member_name_first=np.arange(7), latents=latents, labels=np.arange(5))
  mapped, labels = D.arrays.load_latents(path)
  assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
  np.testing.assert_array_equal(mapped, latents)
  assert mapped.dtype == np.dtype(dtype) and labels.dtype == np.int32

  compressed = str(tmp_path / "lat_compressed.npz")
  np.savez_compressed(compressed, latents=latents, labels=np.arange(5))
  assert D.arrays.npz_memmap(compressed, "latents") is None
  loaded, _ = D.arrays.load_latents(compressed)
  assert not isinstance(loaded, np.memmap)
  np.testing.assert_array_equal(loaded, latents)


# ---------------------------------------------------------------------------- validation


def _bad_configs(tmp_path):
  np.savez(str(tmp_path / "only_latents.npz"), latents=np.zeros((2, 4, 4, 4), np.float32))
  write_idx(str(tmp_path / "orphan-images-idx3-ubyte"), np.zeros((2, 4, 4), np.uint8), False)
  missing = str(tmp_path / "nowhere")
  return [
    (dict(source="imagenet"), r"data\.source: unknown data source 'imagenet'"),
    (dict(source="folder", path=missing), rf"data\.path: folder '{missing}' does not exist"),
    (dict(source="idx", path=missing), rf"data\.path: file '{missing}' does not exist"),
    (dict(source="latents", path=""), r"data\.path: is empty"),
    (dict(resolution=0), r"data\.resolution: must be a positive int, got 0"),
    (dict(channels=2), r"data\.channels: must be 1 \(grayscale\) or 3"),
    (dict(crop="random"), r"data\.crop: unknown crop 'random'"),
    (
      dict(crop="pad", resolution=16),
      r"data\.crop: 'pad' needs images no larger than "
      r"data\.resolution=16.*28x28",
    ),
    (dict(source="tfds", tfds_name=""), r"data\.tfds_name: is empty"),
    (
      dict(source="tfds", tfds_name="imagenet2012", data_dir=missing),
      r"data\.tfds_name: .*not prepared under data_dir",
    ),
    (
      dict(source="latents", path=str(tmp_path / "only_latents.npz")),
      r"data\.path: npz .* lacks required array\(s\) \['labels'\]",
    ),
    (
      dict(source="idx", path=str(tmp_path / "orphan-images-idx3-ubyte")),
      r"data\.label_path: file '.*orphan-labels-idx1-ubyte' does not exist",
    ),
    (dict(num_workers=-1), r"data\.num_workers: must be an int >= 0"),
    (dict(num_classes=5), r"data\.num_classes: MNIST has 10 classes"),
  ]


def test_validate_data_config_names_field_and_problem(tmp_path):
  D.validate_data_config(cfg())
  for overrides, message in _bad_configs(tmp_path):
    with pytest.raises(ValueError, match=message):
      D.validate_data_config(cfg(**overrides))


def test_fields_missing_from_the_config_take_defaults():
  minimal = ml_collections.ConfigDict(dict(source="mnist5k", resolution=32, channels=3))
  batch = next(D.make_train_iterator(minimal, global_batch_size=2, seed=0))
  assert batch["image"].shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_global_batch_must_divide_among_processes():
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    D.make_train_iterator(cfg(), global_batch_size=8, seed=0, process_count=3)


_FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def test_fashion_mnist_idx_from_debian_package():
  c = cfg(source="idx", path=_FASHION)
  assert D.dataset_size(c) == 10000
  images, labels = D.load_images(c, 10000)
  assert images.shape == (10000, 32, 32, 1)
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


def test_high_bit_depth_images_keep_their_range(tmp_path):
  """A 16-bit PNG maps 0..65535 to 0..255 (PIL's own conversion clips it to white) and a float
  TIFF in [0, 1] maps to 0..255 (PIL's makes it black); a float image outside [0, 1] is refused
  by name rather than guessed."""
  ramp = np.linspace(0.0, 1.0, 16 * 16).reshape(16, 16)
  want = np.round(ramp * 255).astype(np.uint8)
  png16, tif = tmp_path / "ramp16.png", tmp_path / "ramp.tif"
  Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(png16)
  Image.fromarray(ramp.astype(np.float32), mode="F").save(tif)
  for path in (png16, tif):
    with Image.open(path) as img:
      got = D.transforms.pil_to_array(img, 1)[..., 0]
    assert np.abs(got.astype(int) - want).max() <= 1, path
    with Image.open(path) as img:
      rgb = D.transforms.pil_to_array(img, 3)
    assert rgb.shape == (16, 16, 3) and np.abs(rgb[..., 1].astype(int) - want).max() <= 1
  Image.fromarray((ramp * 255).astype(np.float32), mode="F").save(tmp_path / "bright.tif")
  with Image.open(tmp_path / "bright.tif") as img, pytest.raises(ValueError, match=r"\[0, 255\]"):
    D.transforms.pil_to_array(img, 1)
