"""Sampling from a checkpoint's EMA weights (``--mode=sample``)."""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from dfm_jax import checkpoint, generate
from dfm_jax.train import Run, setup


def restore_ema(config: ml_collections.ConfigDict, workdir: str, step: int = -1):
  """Returns ``(run, ema_state, step)`` from the latest (``step = -1``) or the given checkpoint."""
  run = setup(config, workdir)
  ckpt = checkpoint.Checkpointer(run.checkpoint_dir, keep=config.keep_checkpoints,
                                 async_save=False)
  available = ckpt.all_steps()
  if not available:
    raise FileNotFoundError(f"no checkpoint in {run.checkpoint_dir}: train first "
                            f"(python -m dfm_jax.main --mode=train ...)")
  if step < 0:
    step = max(available)
  elif step not in available:
    raise ValueError(f"no checkpoint at step {step} in {run.checkpoint_dir}; available: "
                     f"{sorted(available)}")
  state = ckpt.restore(step, run.abstract_state)
  ckpt.close()
  return run, state["ema"], step


def sample_images(run: Run, ema_state, num: int, batch_size: int, seed: int,
                  sampler_cfg=None) -> tuple[np.ndarray, np.ndarray]:
  """``num`` class-cycled samples in [-1, 1] ``[N, H, W, C]`` and their labels."""
  sample_fn = generate.make_sample_fn(run.ema_graphdef(), run.exp, sampler_cfg)
  labels = generate.class_cycle_labels(num, run.config.data.num_classes)
  with jax.set_mesh(run.mesh):
    images = generate.generate(sample_fn, ema_state, jax.random.key(seed), labels, batch_size)
  return images, labels


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``workdir/samples/final_step{N}.png`` and ``.npz``; returns the .npz path."""
  run, ema, step = restore_ema(config, workdir, int(config.sampler.checkpoint_step))
  s = config.sampler
  images, labels = sample_images(run, ema, int(s.num_samples), int(s.batch_size),
                                 config.seed + 1)
  folder = os.path.join(workdir, "samples")
  base = os.path.join(folder, f"final_step{step}")
  if jax.process_index() == 0:
    generate.write_sample_grid(base + ".png", images, ncol=config.data.num_classes)
    generate.save_samples_npz(base + ".npz", images, labels)
    with open(base + ".json", "w") as f:
      json.dump({"step": step, "num_samples": len(labels), "sampler": s.to_dict()}, f,
                indent=2, default=str)
  logging.info("wrote %d samples from step %d to %s.{png,npz}", len(labels), step, base)
  return base + ".npz"
