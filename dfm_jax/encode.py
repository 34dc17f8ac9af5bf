"""Encode a pixel dataset into latent shards for latent-space training (the paper's setting).

  python -m dfm_jax.encode --config=configs/X.py --out=DIR_OR_GS [--flip] [--shard_size=N] \\
      [--num_examples=N] [--config.FIELD=VALUE ...]

Which pixels: the config's ``encode.data`` block when the config has one (a full ``data``
block: source, path, resolution, crop, ...), else ``config.data``, which must then be a pixel
source. A latent training config (``data.source='latents'``) therefore either carries an
``encode.data`` block or gets the pixel source by overrides, e.g.
``--config.data.source=folder --config.data.path=/imagenet/train --config.data.resolution=256
--config.data.channels=3``. The images need 3 channels and a resolution divisible by the
autoencoder's 8x downsampling. Which autoencoder: the ``autoencoder`` block (``kind``,
``weights``, ``scale``, ``shift``, ``batch_size`` = images per encoder call).

Videos: a video source (``moving_digits``, ``video_folder``; ``data.frames`` = T frames per
clip) is encoded clip by clip through `autoencoders.encode_clips`: an image autoencoder codes
every frame on its own (T latent frames), a video autoencoder the whole clip (T' latent frames,
as it compresses time). A record then holds [T', h, w, c] and ``autoencoder.batch_size`` counts
frames (``batch_size // T`` clips per call, at least one).

Output (see `dfm_jax.data.latent_shards`): ``shard-XXXXX-of-YYYYY.array_record`` files of
``--shard_size`` records each, in the source's order (with ``--flip``: record 2i is image or
clip i, record 2i+1 its horizontal mirror), and ``metadata.json`` with per-channel mean/std over
every stored value. Train on it with ``--config.data.source=latents --config.data.path=DIR
--config.data.resolution=H/8 --config.data.channels=C`` (videos: ``--config.data.frames=T'``).

Resuming: a shard is written under ``NAME.tmp`` and renamed when complete, then marked done in
``DIR/.progress``; running the same command again skips completed shards and redoes the rest,
giving the same bytes as an uninterrupted run (the batches of a shard do not depend on what was
skipped). Other settings for the same ``--out`` are refused.

Several processes (``distributed.initialize=True``): process p encodes shards p, p+P, p+2P, ...
over its own devices (no collectives, so processes need not keep in step); after a barrier
process 0 writes ``metadata.json`` from every shard's progress record.

Errors (unreadable data, a corrupt image without ``data.skip_corrupt``) are one ``error: ...``
line on stderr and exit code 1; an invalid config value (``dfm_jax/config_schema.py``) or a
``gs://`` path without credentials exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from dfm_jax import cli_errors, config_schema, errors, storage

FLAGS = flags.FLAGS

_READ_THREADS = 8
_VIDEO_FIELDS = ("frames", "frame_stride", "num_videos", "num_digits")
_SOURCE_FIELDS = (
  "source",
  "path",
  "label_path",
  "tfds_name",
  "split",
  "data_dir",
  "image_key",
  "label_key",
  "resolution",
  "channels",
  "crop",
  "num_classes",
  "skip_corrupt",
)


def pixel_data_config(config) -> ml_collections.ConfigDict:
  """The pixel `data` block to encode: ``config.encode.data`` if present, else ``config.data``
  (ValueError when that is a latent source)."""
  enc = config.get("encode") if hasattr(config, "get") else None
  data = enc.get("data") if enc is not None and hasattr(enc, "get") else None
  field = "encode.data" if data is not None else "data"
  data = data if data is not None else config.data
  if data.get("source") == "latents":
    raise ValueError(
      f"{field}.source='latents' holds no pixels to encode; pass the pixel data "
      "with overrides (--config.data.source=folder --config.data.path=... "
      "--config.data.resolution=256 --config.data.channels=3) or add an "
      "encode.data block to the config"
    )
  return data


class _Encoder:
  """Jit-compiled encoding of fixed-size batches of images, or of clips through
  `autoencoders.encode_clips`, split over this process's devices."""

  def __init__(self, ae, batch_size: int):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from dfm_jax import autoencoders, sharding  # pylint: disable=g-import-not-at-top

    devices = jax.local_devices()
    self.mesh = sharding.make_mesh((len(devices), 1, 1), devices=devices)
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self._in_sharding = sharding.batch_sharding(self.mesh)
    graphdef, state = nnx.split(ae)
    self._state = jax.device_put(state, sharding.replicated(self.mesh))

    def encode(state, x):
      ae = nnx.merge(graphdef, state)
      return autoencoders.encode_clips(ae, x) if x.ndim == 5 else ae.encode_traced(x)

    self._fn = jax.jit(encode, out_shardings=self._in_sharding)
    self._jax = jax

  def latent_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[h, w, C] of an image [H, W, 3], [T', h, w, C] of a clip [T, H, W, 3] (traced, not run)."""
    spec = self._jax.ShapeDtypeStruct((self.batch_size,) + tuple(sample_shape), np.float32)
    return tuple(int(v) for v in self._jax.eval_shape(self._fn, self._state, spec).shape[1:])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """images float32 [n <= batch_size, H, W, 3] in [-1, 1] (clips [n, T, H, W, 3]) -> latents
    float32 [n, h, w, C] ([n, T', h, w, C])."""
    n = len(images)
    if n < self.batch_size:  # one compiled shape: pad, then drop the padding
      pad = np.zeros((self.batch_size - n,) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad])
    x = self._jax.make_array_from_process_local_data(self._in_sharding, images)
    return np.asarray(self._fn(self._state, x))[:n]


def _source_description(data, video: bool) -> dict:
  from dfm_jax.data.config import get  # pylint: disable=g-import-not-at-top

  return {k: get(data, k) for k in _SOURCE_FIELDS + (_VIDEO_FIELDS if video else ())}


def _read_batch(source, records: np.ndarray, flip: bool, pool) -> tuple[np.ndarray, np.ndarray]:
  """Pixels float32 [n, R, R, 3] (clips [n, T, R, R, 3]) in [-1, 1] and labels int32 [n] of
  records (with `flip`, record k is source element k // 2, mirrored when k is odd)."""
  from dfm_jax.data.transforms import to_unit_range  # pylint: disable=g-import-not-at-top

  index = records // 2 if flip else records
  if hasattr(source, "arrays"):  # in-memory sources: one vectorised gather
    images, labels = source.arrays()
    images, labels = images[index], labels[index]
  else:
    elements = list(pool.map(lambda i: source[int(i)], index))
    images = np.stack([e["image"] for e in elements])
    labels = np.array([e["label"] for e in elements])
  images = to_unit_range(images)
  if flip:
    odd = records % 2 == 1
    images[odd] = images[odd, ..., ::-1, :]  # the width axis, of every frame of a clip
  return images, np.asarray(labels, np.int32)


def encode_dataset(
  config,
  out: str,
  *,
  flip: bool = False,
  shard_size: int = 10_000,
  num_examples: int = 0,
  autoencoder=None,
  stream=None,
) -> dict | None:
  """Encodes the pixel data of `config` into latent shards in `out` (see the module docstring).

  Args:
    config: a full config (``data`` or ``encode.data``, ``autoencoder``).
    out: the shard folder, local or ``gs://``.
    flip: also store each image's (clip's) horizontal mirror (right after it).
    shard_size: records per shard.
    num_examples: encode only the first this many source images or clips (0: all).
    autoencoder: an autoencoder object to use instead of building ``config.autoencoder``
      (``encode_traced`` [B, H, W, 3] -> [B, h, w, C], and for clips optionally
      ``encode_video_traced``, see `autoencoders.encode_clips`; tests pass small stand-ins).
    stream: where progress lines go (default stderr).

  Returns:
    The metadata written (process 0), or None on the other processes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dfm_jax.data import latent_shards  # pylint: disable=g-import-not-at-top
  from dfm_jax.progress import Progress  # pylint: disable=g-import-not-at-top

  if not isinstance(shard_size, int) or shard_size < 1:
    raise ValueError(f"--shard_size must be a positive int, got {shard_size!r}")
  if not out:
    raise ValueError("--out is empty; give the shard folder (local or gs://)")
  if not storage.is_remote(out) and os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out} is a file; give the shard folder (local or gs://)")
  data = pixel_data_config(config)
  data_lib.validate_data_config(data)
  resolution, channels = int(data.get("resolution")), int(data.get("channels"))
  if channels != 3:
    raise ValueError(
      f"data.channels={channels}: the autoencoder encodes RGB images; set "
      "data.channels=3 (grayscale images and videos are then converted to RGB)"
    )
  video = bool(getattr(data_lib.source_class(data), "video", False))
  frames = int(data.frames) if video else 0  # validated: video sources need data.frames
  from dfm_jax import autoencoders  # pylint: disable=g-import-not-at-top

  ae = autoencoder if autoencoder is not None else autoencoders.from_config(config.autoencoder)
  down = int(getattr(ae, "downsample", 8))
  if resolution % down:
    raise ValueError(
      f"data.resolution={resolution} is not a multiple of the autoencoder's {down}x downsampling"
    )
  batch_size = int(config.autoencoder.batch_size)
  if batch_size < 1:
    raise ValueError(f"autoencoder.batch_size must be >= 1, got {batch_size}")
  encoder = _Encoder(ae, max(1, batch_size // frames) if video else batch_size)
  sample_shape = ((frames,) if video else ()) + (resolution, resolution, 3)

  if not isinstance(num_examples, int) or num_examples < 0:
    raise ValueError(f"--num_examples must be an int >= 0, got {num_examples!r}")
  source = data_lib.open_source(data)
  examples = min(num_examples, len(source)) if num_examples else len(source)
  if examples == 0:
    raise ValueError("the pixel source holds no images")
  total = examples * (2 if flip else 1)
  num_shards = math.ceil(total / shard_size)
  plan = {
    "count": total,
    "source_examples": examples,
    "flip": bool(flip),
    "shard_size": shard_size,
    "num_shards": num_shards,
    "latent_shape": list(encoder.latent_shape(sample_shape)),
    "autoencoder": {
      "kind": config.autoencoder.kind or getattr(ae, "name", ""),
      "weights": os.fspath(config.autoencoder.weights or "shipped"),
      "scale": float(getattr(ae, "scale", 1.0)),
      "shift": float(getattr(ae, "shift", 0.0)),
      "downsample": down,
    },
    "source": _source_description(data, video),
  }
  pi, pc = jax.process_index(), jax.process_count()
  if pi == 0:
    latent_shards.start(out, plan)
  if pc > 1:
    _barrier("dfm_jax.encode.start")
    latent_shards.start(out, plan)  # checks the plan process 0 wrote
  done = latent_shards.completed_shards(out, num_shards)
  mine = [s for s in range(pi, num_shards, pc) if s not in done]
  if done:
    logging.info("resuming: %d of %d shards already complete", len(done), num_shards)
  todo = sum(min(total, (s + 1) * shard_size) - s * shard_size for s in mine)
  progress = Progress(todo, "encoding", unit="clip" if video else "img", stream=stream)
  with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
    for s in mine:
      lo, hi = s * shard_size, min(total, (s + 1) * shard_size)
      starts = list(range(lo, hi, encoder.batch_size))
      read = lambda a: _read_batch(
        source, np.arange(a, min(a + encoder.batch_size, hi)), flip, pool
      )
      latents, labels = [], []
      pending = pool.submit(read, starts[0])
      for k in range(len(starts)):
        images, batch_labels = pending.result()
        if k + 1 < len(starts):  # read the next batch while this one encodes
          pending = pool.submit(read, starts[k + 1])
        latents.append(encoder(images))
        labels.append(batch_labels)
        progress.update(len(images))
      latent_shards.write_shard(out, s, num_shards, np.concatenate(latents), np.concatenate(labels))
  if pc > 1:
    _barrier("dfm_jax.encode.done")
  if pi != 0:
    return None
  return latent_shards.finalize(out, plan)


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """The command's flags; defined only when it runs (`dfm_jax.main` defines --config too, so
  both modules can be imported in one process, e.g. by the tests)."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.DEFINE_string("out", None, "Shard folder (local or gs://) to write.")
  flags.DEFINE_bool("flip", False, "Also store each image's (clip's) horizontal mirror.")
  flags.DEFINE_integer("shard_size", 10_000, "Records per shard.")
  flags.DEFINE_integer("num_examples", 0, "Encode only the first N images or clips (0: all).")
  flags.DEFINE_bool("debug", False, "Show tracebacks of errors (also: DFM_JAX_DEBUG=1).")
  flags.mark_flags_as_required(["config", "out"])


def expected_errors() -> tuple[type[BaseException], ...]:
  """Errors reported as one line: bad configs, flags, inputs and output folders (a corrupt
  image is a `CorruptRecordError`, a ValueError)."""
  return (ValueError, OSError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  debug = FLAGS.debug or cli_errors.debug_requested()
  from dfm_jax import run as run_lib  # pylint: disable=g-import-not-at-top

  try:
    config_schema.check(FLAGS.config)
    storage.preflight(FLAGS.config, out=FLAGS.out)
    run_lib.maybe_initialize_distributed(FLAGS.config)
    meta = encode_dataset(
      FLAGS.config,
      FLAGS.out,
      flip=FLAGS.flip,
      shard_size=FLAGS.shard_size,
      num_examples=FLAGS.num_examples,
    )
  except KeyboardInterrupt:
    if debug:
      raise
    print("interrupted (run the same command again to resume)", file=sys.stderr)
    sys.exit(errors.EXIT_INTERRUPTED)
  except expected_errors() as e:
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(errors.exit_code(e))
  if meta is not None:
    logging.info(
      "wrote %d latents %s in %d shards to %s; channel std %s",
      meta["count"],
      meta["latent_shape"],
      len(meta["shards"]),
      FLAGS.out,
      np.round(meta["channel_std"], 3).tolist(),
    )


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with flag and config-file problems reported as one ``error: ...`` line and
  exit code 2 (as in `dfm_jax.main`, whose flags cannot be imported next to these)."""
  from dfm_jax import cli_errors  # pylint: disable=g-import-not-at-top

  return cli_errors.parse_flags(FLAGS, argv)


def run():
  from dfm_jax import cli_errors  # pylint: disable=g-import-not-at-top

  cli_errors.sigterm_as_interrupt()
  define_flags()
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
