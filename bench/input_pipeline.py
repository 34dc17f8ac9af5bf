"""Input-pipeline throughput of the data sources against what the default train step consumes.

  python bench/input_pipeline.py                  # 400 images, batch 64, 12 batches per round
  python bench/input_pipeline.py --images 2000 --batches 20 --workers 2

Sources, each through ``dfm_jax.data.make_train_iterator`` (shuffle, repeat, batch, decode and
crop in Grain threads, scale to [-1, 1]):
- folder (JPEG) and folder (PNG): a temporary class-folder tree of `--images` 256x256 RGB images
  (smooth random colour fields plus pixel noise), read at resolution 64 with the centre crop;
- tfds: the same JPEG bytes in an ArrayRecord TFDS dataset built here without TensorFlow (a
  ``GeneratorBasedBuilder``, as tests/test_data_tfds.py does), read the same way;
- mnist5k: the embedded 28x28 digits padded to 32x32 (in-memory arrays).
Files are in the page cache after writing, so the folder figures measure decoding, not disk.

Each round builds a fresh iterator per source, reads two batches (start-up: the first batch
waits while Grain's threads fill their prefetch buffer; its latency is reported), then times
`--batches` batches: the steady rate, with the same amount of prefetching in flight at both
ends. The compiled train step of configs/default.py (batch 64, 32x32x1, on a real mnist5k
batch) is timed for `--steps` steps in the same rounds. Ratio = pipeline images/s / train-step
images/s, per round, median over rounds: above 1 the source keeps up with training. Both share
the same CPU cores; the pipeline runs alone here, not overlapped with training.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from PIL import Image

import common
from dfm_jax import data as data_lib

NUM_CLASSES = 4


def synthetic_images(num: int, size: int, seed: int = 0):
  """``num`` RGB uint8 images: an upsampled 8x8 random colour field plus pixel noise."""
  rng = np.random.default_rng(seed)
  for _ in range(num):
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).resize(
      (size, size), Image.Resampling.BICUBIC
    )
    noisy = np.asarray(field, np.float32) + rng.normal(0, 8, (size, size, 3))
    yield Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_folder(root: str, images: list[bytes], ext: str) -> None:
  for i, encoded in enumerate(images):
    folder = os.path.join(root, f"class_{i % NUM_CLASSES}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{i:05d}.{ext}"), "wb") as f:
      f.write(encoded)


def build_tfds(data_dir: str, jpegs: list[bytes]) -> str:
  """An ArrayRecord TFDS dataset holding ``jpegs``; returns its name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class DfmBenchImages(tfds.core.GeneratorBasedBuilder):
    """Encoded JPEG images with cyclic labels."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, encoded in enumerate(jpegs):
        yield i, {"image": encoded, "label": i % NUM_CLASSES}

  DfmBenchImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "dfm_bench_images"


def encode(images, fmt: str) -> list[bytes]:
  out = []
  for img in images:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    out.append(buf.getvalue())
  return out


def pixel_config(workers: int, **fields) -> ml_collections.ConfigDict:
  c = data_lib.default_data_config()
  c.update(resolution=64, channels=3, crop="center", num_classes=NUM_CLASSES, num_workers=workers)
  c.update(fields)
  return c


class PipelineRun:
  """Calling it builds a fresh iterator (new seed each call), reads ``skip + batches`` batches,
  and records the steady rate over the last ``batches`` (images/s) and the first-batch latency."""

  def __init__(self, data, batch: int, batches: int, skip: int = 2):
    self.data, self.batch, self.batches, self.skip = data, batch, batches, skip
    self.rates: list[float] = []
    self.startup: list[float] = []

  def __call__(self):
    start = time.perf_counter()
    it = data_lib.make_train_iterator(
      self.data, global_batch_size=self.batch, seed=len(self.rates) + 1
    )
    next(it)
    self.startup.append(time.perf_counter() - start)
    for _ in range(self.skip - 1):
      next(it)
    steady = time.perf_counter()
    for _ in range(self.batches):
      next(it)
    self.rates.append(self.batch * self.batches / (time.perf_counter() - steady))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=400, help="images in folder and tfds sets")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument(
    "--batches", type=int, default=12, help="timed batches per pipeline run, after two untimed ones"
  )
  parser.add_argument("--steps", type=int, default=3, help="train steps per timed run")
  parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: threads)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--no-tfds", action="store_true", help="skip the TFDS source")
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)

  report.say(common.machine_summary())
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    pil = list(synthetic_images(args.images, 256))
    jpegs, pngs = encode(pil, "JPEG"), encode(pil, "PNG")
    write_folder(os.path.join(tmp, "jpeg"), jpegs, "jpg")
    write_folder(os.path.join(tmp, "png"), pngs, "png")
    sources = {
      "folder (JPEG)": pixel_config(args.workers, source="folder", path=os.path.join(tmp, "jpeg")),
      "folder (PNG)": pixel_config(args.workers, source="folder", path=os.path.join(tmp, "png")),
    }
    if not args.no_tfds:
      name = build_tfds(os.path.join(tmp, "tfds"), jpegs)
      sources["tfds ArrayRecord (JPEG)"] = pixel_config(
        args.workers, source="tfds", tfds_name=name, data_dir=os.path.join(tmp, "tfds")
      )
    mnist = data_lib.default_data_config()
    mnist.num_workers = args.workers
    sources["mnist5k (arrays)"] = mnist
    report.say(
      f"{args.images} images 256x256: JPEG {np.mean([len(b) for b in jpegs]) / 1024:.1f} "
      f"KiB, PNG {np.mean([len(b) for b in pngs]) / 1024:.1f} KiB on average; prepared in "
      f"{time.perf_counter() - start:.1f} s"
    )

    config = common.load_config("default")
    real = next(
      data_lib.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    )
    step = common.build_train_steps(
      {"default": config}, batches={"default": real}, devices=jax.devices()[:1]
    )["default"]

    def train_steps():
      for _ in range(args.steps):
        step()

    pipelines = {
      name: PipelineRun(data, args.batch, args.batches) for name, data in sources.items()
    }
    fns = {**pipelines, "train step": train_steps}
    times = common.interleaved_times(fns, rounds=args.rounds, warmup=1)

  consumed = config.batch_size * args.steps / np.asarray(times["train step"])
  rows, ratios = [], {}
  for name, pipe in pipelines.items():
    produced = np.asarray(pipe.rates[-args.rounds :])  # the warm-up call is not a round
    ratios[name] = common.paired_ratio(produced, consumed)
    rows.append(
      [
        name,
        f"{common.median(produced):.0f}",
        f"{common.median(pipe.startup[-args.rounds :]):.2f}",
        f"{ratios[name][0]:.2f} ({ratios[name][1]:.2f}-{ratios[name][2]:.2f})",
      ]
    )
  rows.append(
    [
      f"train step, configs/default.py (batch {config.batch_size}, "
      f"{config.data.resolution}x{config.data.resolution}x{config.data.channels})",
      f"{common.median(consumed):.0f}",
      "",
      "1",
    ]
  )
  report.table(
    f"Images/s (median over {args.rounds} rounds; pixel sources at 64x64x3, centre crop, "
    f"data.num_workers={args.workers}); ratio = pipeline / train-step consumption (IQR)",
    ["source", "images/s", "first batch s", "ratio to train step"],
    rows,
  )
  report.finish(
    f"folder (JPEG) pipeline / default train-step consumption: {ratios['folder (JPEG)'][0]:.2f}"
  )


if __name__ == "__main__":
  main()
