"""Compare two image sets with FID, KID and the Inception Score, pytorch-fid style.

    python -m dfm_jax.fid PATH_A PATH_B [--batch-size N] [--fdd-weights DINOV2.pth]

Each path is a folder of images (searched recursively; .png, .jpg, .jpeg, .bmp, .ppm, .pgm,
.tif, .tiff, .webp, read as RGB) or an ``.npz`` holding uint8 images ``[N, H, W, C]`` with C in
1, 3, 4 (or grayscale ``[N, H, W]``). The images of an ``.npz`` are its array ``images``, else
``samples``, else ``arr_0`` (what ``np.savez(path, x)`` writes), else its only array; a file with
several arrays and none of these names is refused, listing its keys. Channels-first arrays
``[N, C, H, W]`` are refused with the transpose that fixes them. Progress goes to stderr; the last
stdout line is a JSON object ``{"fid", "kid", "kid_std", "is", "is_std", "num_a", "num_b"}``
where the Inception Score is that of PATH_A (``null`` when the cached weights lack the
classifier). The weights come from ``python -m dfm_jax.evaluation.weights``. With
``--fdd-weights`` (an official DINOv2 checkpoint such as ``dinov2_vitl14_pretrain.pth``) the JSON
also holds ``fdd``, the Frechet distance in DINOv2 CLS features (FD-DINOv2: bicubic antialiased
resize to 224, ImageNet normalisation; see ``dfm_jax.evaluation.dinov2``).

Bad inputs (missing paths, unreadable or truncated files, wrong keys, dtypes or shapes) print one
line ``error: ...`` on stderr and exit with status 2; missing or unreadable Inception weights exit
with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from dfm_jax.data import transforms
from dfm_jax.data.folder import IMAGE_EXTENSIONS
from dfm_jax.errors import InputError

NPZ_IMAGE_KEYS = ("images", "samples", "arr_0")  # tried in this order
# What numpy raises on files that are not (complete) .npz archives.
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _read_image(path: Path) -> np.ndarray:
  try:
    with Image.open(path) as im:
      return transforms.pil_to_array(im, 3)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise InputError(f"cannot read image {path}: {e}") from e


def _read_npz(path: Path) -> np.ndarray:
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
      raise InputError(
        f"cannot read {path}: not an .npz file (no zip or .npy header; "
        f"{'it is empty' if not magic else 'it starts with ' + repr(magic)})"
      )
    loaded = np.load(path, allow_pickle=False)
  except _NPZ_ERRORS as e:
    raise InputError(
      f"cannot read {path} as an .npz file (truncated or damaged?): {type(e).__name__}: {e}"
    ) from e
  if isinstance(loaded, np.ndarray):  # an .npy file named .npz
    key, images = "(.npy array)", loaded
  else:
    with loaded as data:
      keys = list(data.files)
      if not keys:
        raise InputError(f"{path} holds no arrays")
      key = next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
      if key is None and len(keys) > 1:
        raise InputError(
          f"{path} has no image array: expected one of the keys "
          f"{', '.join(NPZ_IMAGE_KEYS)} (or a single array), found "
          f"{', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
        )
      key = key or keys[0]
      try:
        images = data[key]
      except _NPZ_ERRORS as e:
        raise InputError(
          f"cannot read array '{key}' of {path} (truncated or damaged "
          f"file?): {type(e).__name__}: {e}"
        ) from e
  check_image_array(images, f"{path}: array '{key}'")
  return images


def check_image_array(images: np.ndarray, name: str) -> None:
  """Raises InputError unless ``images`` is uint8 ``[N, H, W, C]`` (C in 1, 3, 4) or
  ``[N, H, W]``; channels-first ``[N, C, H, W]`` is named as such."""
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise InputError(
      f"{name} must be uint8 images [N, H, W, C], got {images.dtype} of shape {images.shape}"
    )
  if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
    if images.shape[1] in (1, 3, 4) and images.shape[-1] > 4:
      raise InputError(
        f"{name} has shape {images.shape}, which looks channels-first "
        "[N, C, H, W]; save it as [N, H, W, C], e.g. "
        "images.transpose(0, 2, 3, 1)"
      )
    raise InputError(
      f"{name} has shape {images.shape}: {images.shape[-1]} channels, expected "
      "[N, H, W, C] with C = 1 (gray), 3 (RGB) or 4 (RGBA)"
    )


def load_images(path) -> np.ndarray | list[np.ndarray]:
  """uint8 images of a folder or ``.npz``: array ``[N, H, W, C]``, or a list if sizes differ."""
  p = Path(path)
  if not p.exists():
    raise InputError(f"path does not exist: {path}")
  if p.is_file() and p.suffix.lower() == ".npz":
    return _read_npz(p)
  if not p.is_dir():
    raise InputError(f"{path} is neither a folder of images nor an .npz file")
  files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {path}")
  images = [_read_image(f) for f in files]
  if len({im.shape for im in images}) == 1:
    return np.stack(images)
  return images


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m dfm_jax.fid", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("path_a", help="generated images: folder or .npz")
  parser.add_argument("path_b", help="reference images: folder or .npz")
  parser.add_argument("--batch-size", type=int, default=50, help="images per network call")
  parser.add_argument(
    "--fdd-weights",
    metavar="PATH",
    default=None,
    help="official DINOv2 checkpoint (.pth): also report FDD",
  )
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error("--batch-size must be positive")
  if args.fdd_weights is not None and not Path(args.fdd_weights).is_file():
    print(f"error: --fdd-weights: no such file: {args.fdd_weights}", file=sys.stderr)
    return 2
  if args.fdd_weights is not None:  # before any image is read or scored
    from dfm_jax.evaluation import dinov2

    problem = dinov2.checkpoint_problem(args.fdd_weights)
    if problem:
      print(f"error: --fdd-weights: {problem}", file=sys.stderr)
      return 2
  try:
    images_a, images_b = load_images(args.path_a), load_images(args.path_b)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path, images in ((args.path_a, images_a), (args.path_b, images_b)):
    if len(images) < 2:
      print(f"error: {path}: FID needs at least 2 images, found {len(images)}", file=sys.stderr)
      return 2
  print(
    f"{len(images_a)} images in {args.path_a}, {len(images_b)} in {args.path_b}", file=sys.stderr
  )

  from dfm_jax.evaluation import fid_features, weights

  try:
    params = fid_features.inception_params()
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (*_NPZ_ERRORS, AttributeError) as e:
    print(
      f"error: cannot load the Inception weights {weights.weights_path()} "
      f"({type(e).__name__}: {e}); refetch them with `{weights.FETCH_COMMAND} --force`",
      file=sys.stderr,
    )
    return 1
  result = fid_features.compute_metrics(
    images_a, images_b, batch_size=args.batch_size, params=params, progress=True
  )
  if result["is"] is None:
    print(
      "note: the cached Inception weights have no classifier, so no Inception Score; "
      "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
      "`python -m dfm_jax.evaluation.weights --from-pth PATH` to get it",
      file=sys.stderr,
    )
  out = {
    "fid": result["fid"],
    "kid": result["kid"],
    "kid_std": result["kid_std"],
    "is": result["is"],
    "is_std": result["is_std"],
    "num_a": result["num_fake"],
    "num_b": result["num_real"],
  }
  if args.fdd_weights is not None:
    from dfm_jax.evaluation import dinov2

    try:
      model = dinov2.load_dinov2(args.fdd_weights)
    except (KeyError, ValueError, OSError) as e:
      print(f"error: --fdd-weights {args.fdd_weights}: {e}", file=sys.stderr)
      return 2
    out["fdd"] = dinov2.frechet_distance_of_features(
      dinov2.dinov2_features(model, fid_features.to_rgb_uint8(np.stack(images_a))),
      dinov2.dinov2_features(model, fid_features.to_rgb_uint8(np.stack(images_b))),
    )
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
