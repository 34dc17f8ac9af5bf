"""``--mode=eval``: FID / KID / IS (and a classifier's accuracy and Frechet distance for 28x28-class
data) of samples from a checkpoint's EMA weights, written to ``workdir/eval/*.json``.

The sampler settings (steps per stage, thresholds, solver, cfg scale, guidance interval) come from
``config.sampler`` and can be overridden on the command line, e.g.
``--config.sampler.cfg_scale=1.5``.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from dfm_jax import data as data_lib, reporting
from dfm_jax.evaluation import classifier as classifier_lib
from dfm_jax.evaluation import fid_features
from dfm_jax.inference import restore_ema, sample_images


def _reference_key(config) -> str:
  d = config.data
  name = d.tfds_name if d.source == "tfds" else os.path.basename(str(d.path)) or d.source
  return (f"{d.source}-{name}-{config.eval.real_split}-{d.resolution}px-{d.channels}ch-"
          f"{d.crop}-{config.eval.num_real}")


def classifier_scores(config, fake_uint8: np.ndarray, labels: np.ndarray,
                      real_uint8: np.ndarray) -> dict:
  """Accuracy of a classifier trained on the real training split, and its Frechet distance."""
  n = data_lib.dataset_size(config.data)
  train_images, train_labels = data_lib.load_images(config.data, n, seed=0)
  clf = classifier_lib.get_classifier(config.eval.classifier, train_images, train_labels)
  return {"classifier_accuracy": float(clf.accuracy(fake_uint8, labels)),
          "classifier_fd": float(classifier_lib.classifier_frechet_distance(
              clf, fake_uint8, real_uint8))}


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples ``config.eval.num_samples`` images and scores them; returns the metrics dict."""
  if config.data.source == "latents":
    raise ValueError("eval needs pixel data; this config trains on latents (decode the samples "
                     "with the autoencoder and use `python -m dfm_jax.fid`)")
  start = time.time()
  run, ema, step = restore_ema(config, workdir, int(config.sampler.checkpoint_step))
  fake, labels = sample_images(run, ema, int(config.eval.num_samples),
                               int(config.eval.batch_size), config.seed + 2)
  fake_uint8 = reporting.to_uint8(fake)
  sample_seconds = time.time() - start
  real_uint8, _ = data_lib.load_images(config.data, int(config.eval.num_real),
                                       split=config.eval.real_split, seed=1)
  metrics = fid_features.compute_metrics(fake_uint8, real_uint8, ref_key=_reference_key(config))
  if config.eval.classifier:
    metrics.update(classifier_scores(config, fake_uint8, labels, real_uint8))
  s = config.sampler
  result = dict(metrics, step=step, sample_seconds=sample_seconds, sampler=s.to_dict())
  tag = (f"step{step}_cfg{s.cfg_scale:g}_steps{'-'.join(map(str, s.steps_per_stage))}"
         f"_tau{'-'.join(f'{t:g}' for t in s.thresholds) or 'none'}_{s.solver}")
  if jax.process_index() == 0:
    path = os.path.join(workdir, "eval", tag + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=2, default=str)
    logging.info("eval at step %d: %s -> %s", step,
                 {k: v for k, v in result.items() if k != "sampler"}, path)
    print(json.dumps({k: v for k, v in result.items() if k != "sampler"}, default=str))
  return result
