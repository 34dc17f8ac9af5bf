"""Compare two image sets with FID, KID and the Inception Score, pytorch-fid style.

    python -m dfm_jax.fid PATH_A PATH_B [--batch-size N]

Each path is a folder of images (searched recursively; .png, .jpg, .jpeg, .bmp, .ppm, .pgm,
.tif, .tiff, .webp, read as RGB) or an ``.npz`` holding uint8 images ``[N, H, W, C]`` (key
``images``, else the first array). Progress goes to stderr; the last stdout line is a JSON object
``{"fid", "kid", "kid_std", "is", "is_std", "num_a", "num_b"}`` where the Inception Score is that
of PATH_A (``null`` when the cached weights lack the classifier). The weights come from
``python -m dfm_jax.evaluation.weights``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}


class InputError(Exception):
    """A path that cannot be turned into a set of images."""


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not data.files:
                raise InputError(f"{path} holds no arrays")
            key = "images" if "images" in data.files else data.files[0]
            images = data[key]
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise InputError(f"{path}: array '{key}' must be uint8 images [N, H, W, C], got "
                         f"{images.dtype} of shape {images.shape}")
    return images


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
    parser = argparse.ArgumentParser(prog="python -m dfm_jax.fid",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("path_a", help="generated images: folder or .npz")
    parser.add_argument("path_b", help="reference images: folder or .npz")
    parser.add_argument("--batch-size", type=int, default=50, help="images per network call")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    try:
        images_a, images_b = load_images(args.path_a), load_images(args.path_b)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, images in ((args.path_a, images_a), (args.path_b, images_b)):
        if len(images) < 2:
            print(f"error: {path}: FID needs at least 2 images, found {len(images)}",
                  file=sys.stderr)
            return 2
    print(f"{len(images_a)} images in {args.path_a}, {len(images_b)} in {args.path_b}",
          file=sys.stderr)

    from dfm_jax.evaluation import fid_features

    try:
        params = fid_features.inception_params()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = fid_features.compute_metrics(images_a, images_b, batch_size=args.batch_size,
                                          params=params, progress=True)
    if result["is"] is None:
        print("note: the cached Inception weights have no classifier, so no Inception Score; "
              "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
              "`python -m dfm_jax.evaluation.weights --from-pth PATH` to get it", file=sys.stderr)
    print(json.dumps({"fid": result["fid"], "kid": result["kid"], "kid_std": result["kid_std"],
                      "is": result["is"], "is_std": result["is_std"],
                      "num_a": result["num_fake"], "num_b": result["num_real"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
