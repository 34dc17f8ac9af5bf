"""``--mode=eval`` and the optional small evaluation during training: sample from the EMA
weights, score with the metrics of ``config.eval.metrics`` (see ``scores.py``), and write
``workdir/eval/<tag>.json``.

The sampler settings (steps per stage, thresholds, solver, per-stage cfg scales and guidance
intervals) come from ``config.sampler`` and can be overridden on the command line, e.g.
``--config.sampler.cfg_scale=1.5``. Latent runs are scored in pixel space: samples are decoded by
the config's autoencoder and compared with ``eval.reference`` (a pixel data block).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from dfm_jax import config_schema, data as data_lib, sampling, storage
from dfm_jax.evaluation import scores


def reference_key(config) -> str:
  """Cache key of the reference set's Inception statistics (data set, split, size, crop)."""
  d = scores.reference_data(config)
  name = d.tfds_name if d.source == "tfds" else os.path.basename(str(d.path)) or d.source
  return (
    f"{d.source}-{name}-{config.eval.real_split}-{d.resolution}px-{d.channels}ch-"
    f"{d.crop}-{config.eval.num_real}"
  )


def _reference_block(config):
  """The reference data block, validated; a problem is named by the config block it is in."""
  data = scores.reference_data(config)
  where = "data" if data is config.data else "eval.reference"
  try:
    data_lib.validate_data_config(data)
  except ValueError as err:
    text = str(err)
    raise ValueError(f"{where}.{text.removeprefix('data.')}" if text.startswith("data.") else text)
  if not data_lib.source_class(data).pixels:
    raise ValueError(
      "eval needs pixel reference images: set eval.reference to a pixel data "
      "block (e.g. --config.eval.reference.source=folder "
      "--config.eval.reference.path=DIR) for a latent run"
    )
  return data


def check_reference(config) -> None:
  """Opens the reference set (decoding no picture) so that a bad reference block,
  ``eval.real_split`` or ``eval.num_real`` stops ``--mode=eval`` before it samples; ValueError."""
  data = _reference_block(config)
  count = len(data_lib.open_source(data, config.eval.real_split))
  if int(config.eval.num_real) > count:
    raise ValueError(
      f"eval.num_real={config.eval.num_real} but the reference set ({data.source}, split "
      f"{config.eval.real_split!r}) holds {count} pictures"
    )


def check_eval_config(config) -> None:
  """One ValueError naming every problem with ``eval.metrics``, their settings and the
  reference set they compare with; run before any sampling."""
  problems = scores.check_metrics_config(config)
  needs_reference = not problems and any(  # every metric but IS compares with real pictures
    not isinstance(m, scores.InceptionScore) for m in scores.active_metrics(config)
  )
  if needs_reference:
    try:
      check_reference(config)
    except ValueError as err:
      problems.append(str(err))
  if problems:
    raise config_schema.InvalidConfigError(problems)


def load_reference(config) -> np.ndarray:
  """``eval.num_real`` uint8 reference pictures ``[M, H, W, C]`` (deterministic choice)."""
  images, _ = data_lib.load_images(
    _reference_block(config), int(config.eval.num_real), split=config.eval.real_split, seed=1
  )
  return images


def score_samples(
  config,
  samples: np.ndarray,
  labels: np.ndarray,
  metrics: list[scores.Metric] | None = None,
  progress: bool = True,
) -> dict:
  """Scores samples in the data space (decoded for latent runs); returns the metrics dict."""
  return score_pictures(config, sampling.to_display(samples, config), labels, metrics, progress)


def score_pictures(
  config,
  pictures: np.ndarray,
  labels: np.ndarray,
  metrics: list[scores.Metric] | None = None,
  progress: bool = True,
) -> dict:
  """Scores uint8 pictures ``[N, H, W, C]`` (videos ``[N, T, H, W, C]``) with labels ``[N]``."""
  metrics = scores.active_metrics(config) if metrics is None else metrics
  ctx = scores.EvalContext(
    config,
    pictures,
    labels,
    lambda: load_reference(config),
    ref_key=reference_key(config),
    progress=progress,
  )
  return scores.evaluate(ctx, metrics)


def eval_tag(step: int, s) -> str:
  def join(v):
    return "-".join(f"{x:g}" for x in np.ravel(v))

  return (
    f"step{step}_cfg{join(s.cfg_scale)}_steps{'-'.join(map(str, s.steps_per_stage))}"
    f"_tau{'-'.join(f'{t:g}' for t in s.thresholds) or 'none'}_{s.solver}"
  )


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples ``config.eval.num_samples`` items (or reads ``eval.samples_from``) and scores them;
  returns the metrics dict and writes it to ``workdir/eval/<tag>.json``."""
  check_eval_config(config)
  if config.eval.samples_from:
    saved = load_samples(config.eval.samples_from)
    pictures, labels, step = saved["pictures"], saved["labels"], saved["step"]
    sample_seconds, sampler_settings = saved["sample_seconds"], saved["sampler"]
  else:
    start = time.time()
    run, ema, step = sampling.restore_ema(config, workdir, int(config.sampler.checkpoint_step))
    samples, labels = sampling.sample_images(
      run, ema, int(config.eval.num_samples), int(config.eval.batch_size), config.seed + 2
    )
    pictures = sampling.to_display(samples, config)  # latents decoded here
    sample_seconds = time.time() - start
    sampler_settings = config.sampler.to_dict()
    if config.sampler.auto_schedule:  # record (and tag) the schedule the samples used
      resolved = run.exp.sampler.with_stage_stds(sampling.model_stage_stds(ema))
      sampler_settings["steps_per_stage"] = list(resolved.steps_per_stage)
      sampler_settings["thresholds"] = list(resolved.thresholds)
  tag = eval_tag(step, ml_collections.ConfigDict(sampler_settings))
  folder = epath.Path(workdir) / "eval"
  if config.eval.save_samples and not config.eval.samples_from:
    if jax.process_index() == 0:
      save_samples(folder / (tag + ".samples.npz"), pictures, labels, step, sample_seconds, config)
  metrics = score_pictures(config, pictures, labels)
  result = dict(metrics, step=step, sample_seconds=sample_seconds, sampler=sampler_settings)
  if jax.process_index() == 0:
    if metrics:  # a sampling-only pass must not replace scored numbers
      path = folder / (tag + ".json")
      storage.write_json(path, result)  # whole or not at all: a kill keeps the last scores
      logging.info("eval at step %d -> %s", step, path)
    print(json.dumps({k: v for k, v in result.items() if k != "sampler"}, default=str))
  return result


SAMPLE_KEYS = ("pictures", "labels", "step", "sample_seconds", "sampler")


def save_samples(path, pictures, labels, step: int, sample_seconds: float, config) -> None:
  """Writes the scored pictures (uint8 ``[N, H, W, C]``, videos ``[N, T, H, W, C]``; latent
  runs already decoded), labels ``[N]``, the checkpoint step and the sampler settings, for a
  later ``--config.eval.samples_from=PATH`` (which then needs neither checkpoint nor
  autoencoder)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    np.savez_compressed(
      f,
      pictures=np.asarray(pictures, np.uint8),
      labels=np.asarray(labels),
      step=np.int64(step),
      sample_seconds=np.float64(sample_seconds),
      sampler=json.dumps(config.sampler.to_dict(), default=list),
    )
  logging.info("samples -> %s", path)


def load_samples(path) -> dict:
  """Reads a file written by :func:`save_samples`; a clear error if it is not one."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"eval.samples_from: {path} does not exist")
  try:
    with path.open("rb") as f, np.load(f) as z:
      missing = [k for k in SAMPLE_KEYS if k not in z.files]
      if missing:
        raise ValueError(
          f"eval.samples_from: {path} lacks {missing}; expected a file written by "
          "--mode=eval --config.eval.save_samples=True"
        )
      out = {k: z[k] for k in SAMPLE_KEYS}
  except (OSError, EOFError, ValueError) as err:
    if "eval.samples_from" in str(err):
      raise
    raise ValueError(f"eval.samples_from: {path} is not a readable .npz ({err})") from err
  pictures = out["pictures"]
  if pictures.dtype != np.uint8 or len(pictures) != len(out["labels"]):
    raise ValueError(
      f"eval.samples_from: {path} has {pictures.dtype} pictures {pictures.shape} for "
      f"{len(out['labels'])} labels; expected uint8 and one label each"
    )
  out["step"] = int(out["step"])
  out["sample_seconds"] = float(out["sample_seconds"])
  out["sampler"] = json.loads(str(out["sampler"]))
  return out
