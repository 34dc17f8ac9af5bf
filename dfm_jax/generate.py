"""Sampling from a trained model: one compiled sampler, batched generation, grids and arrays."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm_jax import reporting, sampler as sampler_lib
from dfm_jax.experiment import Experiment
from dfm_jax.train_state import make_velocity_fn


def make_sample_fn(graphdef: nnx.GraphDef, exp: Experiment,
                   sampler_cfg: sampler_lib.SamplerConfig | None = None,
                   previews: bool = False) -> Callable:
  """Returns jitted ``fn(model_state, key, labels [B]) -> dict`` (see ``sampler.sample``).

  The whole stage-scheduled loop compiles once per batch size. Images come back in the data
  range (``[-1, 1]`` for pixels).
  """
  cfg = sampler_cfg or exp.sampler

  @jax.jit
  def sample_fn(model_state, key, labels):
    model = nnx.merge(graphdef, model_state)
    keys = jax.random.split(key, exp.decomposition.num_stages)
    noise = tuple(jax.random.normal(k, (labels.shape[0],) + shape, jnp.float32)
                  for k, shape in zip(keys, exp.model.stage_shapes))
    return sampler_lib.sample(make_velocity_fn(model), noise, labels, cfg,
                              null_label=exp.null_label, decomposition=exp.decomposition,
                              previews=previews)

  return sample_fn


def class_cycle_labels(num: int, num_classes: int) -> np.ndarray:
  """Labels ``0, 1, ..., num_classes - 1, 0, 1, ...`` (int32 ``[num]``)."""
  return (np.arange(num) % num_classes).astype(np.int32)


def generate(sample_fn: Callable, model_state, key: jax.Array, labels: np.ndarray,
             batch_size: int) -> np.ndarray:
  """Samples ``len(labels)`` images in batches; returns float32 ``[N, H, W, C]`` on the host."""
  out = []
  for i in range(0, len(labels), batch_size):
    chunk = labels[i:i + batch_size]
    pad = batch_size - len(chunk)
    padded = np.concatenate([chunk, np.zeros(pad, np.int32)]) if pad else chunk
    result = sample_fn(model_state, jax.random.fold_in(key, i), jnp.asarray(padded))
    out.append(np.asarray(jax.device_get(result["images"]))[:len(chunk)])
  return np.concatenate(out)


def write_sample_grid(path: str, images: np.ndarray, ncol: int, upscale: int = 1) -> np.ndarray:
  """Saves images in [-1, 1] ``[N, H, W, C]`` as one PNG grid; returns the uint8 grid."""
  grid = reporting.image_grid(reporting.to_uint8(images), ncol)
  reporting.save_png(path, grid, upscale=upscale)
  return grid


def write_preview_grid(path: str, previews: np.ndarray, upscale: int = 1) -> np.ndarray:
  """Previews ``[S, N, H, W, C]``: one row per sample, one column per stage (coarse to fine)."""
  s, n = previews.shape[:2]
  tiles = np.transpose(np.asarray(previews), (1, 0, 2, 3, 4)).reshape((s * n,) +
                                                                      previews.shape[2:])
  return write_sample_grid(path, tiles, ncol=s, upscale=upscale)


def save_samples_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes ``images`` (uint8 ``[N, H, W, C]``) and ``labels`` to an .npz file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez_compressed(path, images=reporting.to_uint8(images), labels=labels)

