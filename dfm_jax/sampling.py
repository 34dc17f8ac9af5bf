"""Sampling from a run: the one path used by ``--mode=sample``, ``--mode=eval``, the periodic
grids during training and the notebook.

``restore_ema`` rebuilds a run from its config and checkpoint (no training data needed) and
returns the weights the method samples with (the EMA model; the cascade adds its snapshot),
``make_sample_fn`` compiles the method's sampler once per batch size, ``generate`` samples in
batches with progress, and ``to_display`` turns samples into uint8 pictures (latents decoded by
the config's autoencoder, or shown as a channel projection when there is none).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from dfm_jax import checkpoint, reporting, sharding
from dfm_jax import storage
from dfm_jax.experiment import Experiment
from dfm_jax.progress import Progress
from dfm_jax.run import Run, setup
from dfm_jax.sampler import SamplerConfig

GRID_MAX = 100  # samples shown in a sample-mode grid; the .npz holds them all


def make_sample_fn(
  graphdef: nnx.GraphDef,
  exp: Experiment,
  sampler_cfg: SamplerConfig | None = None,
  previews: bool = False,
) -> Callable:
  """Returns jitted ``fn(model_state, key, labels [B]) -> dict`` (see ``Method.sample``).

  ``model_state``: what ``Method.sampling_state`` picks from a train state (the EMA model's
  state, or a tuple of model states), each merged with ``graphdef`` (the model's, e.g.
  ``Run.ema_graphdef()``). The whole sampling loop compiles once per batch size. ``images`` come back in the data space
  (``[-1, 1]`` for pixels, the model's latent space for latents).
  """
  cfg = sampler_cfg or exp.sampler
  method = exp.method

  def build(cfg):
    @jax.jit
    def sample_fn(model_state, key, labels):
      model = jax.tree.map(
        lambda s: nnx.merge(graphdef, s), model_state, is_leaf=lambda x: isinstance(x, nnx.State)
      )
      return method.sample(model, key, labels, cfg, previews=previews)

    return sample_fn

  if not cfg.auto_schedule:
    return build(cfg)
  compiled = {}

  def auto_sample_fn(model_state, key, labels):
    # The schedule follows the weights' stored statistics (concrete here, outside the jit).
    resolved = cfg.with_stage_stds(model_stage_stds(model_state))
    if resolved not in compiled:
      logging.info(
        "sampler.auto_schedule: steps per stage %s, thresholds %s",
        resolved.steps_per_stage,
        resolved.thresholds,
      )
      compiled[resolved] = build(resolved)
    return compiled[resolved](model_state, key, labels)

  return auto_sample_fn


def model_stage_stds(model_state) -> np.ndarray:
  """``[S]``: the per-stage data std a DFM model's state stores (replicated on every device)."""
  std = model_state["data_std"][...]
  return np.asarray(std.addressable_data(0) if isinstance(std, jax.Array) else std, np.float64)


def class_cycle_labels(num: int, num_classes: int) -> np.ndarray:
  """Labels ``0, 1, ..., num_classes - 1, 0, 1, ...`` (int32 ``[num]``)."""
  return (np.arange(num) % num_classes).astype(np.int32)


def generate(
  sample_fn: Callable,
  model_state,
  key: jax.Array,
  labels: np.ndarray,
  batch_size: int,
  progress: Progress | None = None,
) -> dict[str, np.ndarray]:
  """Samples ``len(labels)`` items in batches of ``batch_size`` (the last one padded; batch i
  with key ``fold_in(key, i)``). Returns float32 host arrays: ``images [N, ...]`` and, from a
  sample function made with previews, ``previews [S, N, ...]``."""
  images, previews = [], []
  for i in range(0, len(labels), batch_size):
    chunk = labels[i : i + batch_size]
    pad = batch_size - len(chunk)
    padded = np.concatenate([chunk, np.zeros(pad, np.int32)]) if pad else chunk
    result = jax.device_get(sample_fn(model_state, jax.random.fold_in(key, i), jnp.asarray(padded)))
    images.append(np.asarray(result["images"])[: len(chunk)])
    if "previews" in result:
      previews.append(np.asarray(result["previews"])[:, : len(chunk)])
    if progress is not None:
      progress.update(len(chunk))
  out = {"images": np.concatenate(images)}
  if previews:
    out["previews"] = np.concatenate(previews, axis=1)
  return out


def restore_ema(
  config: ml_collections.ConfigDict, workdir: str, step: int = -1
) -> tuple[Run, nnx.State, int]:
  """``(run, ema_state, step)`` from the latest (``step = -1``) or the given checkpoint;
  ``ema_state`` is what the method samples with (``Method.sampling_state``: the EMA weights, for
  the cascade with its frozen low-resolution model).

  Reads no training data: the run is validated without the data block. The fields that define
  the trained model must equal those of ``workdir/config.json`` (the config the run trained
  with); sampler and evaluation settings may differ.
  """
  check_against_saved_config(config, workdir)
  run = setup(config, workdir, check_data=False)
  ckpt = checkpoint.Checkpointer(
    run.checkpoint_dir,
    keep=config.keep_checkpoints,
    async_save=False,
    facts=run.checkpoint_facts(),
  )
  try:
    available = ckpt.all_steps()
    if not available:
      raise FileNotFoundError(
        f"no checkpoint in {run.checkpoint_dir}: train first "
        f"(python -m dfm_jax.main --mode=train ...)"
      )
    if step >= 0 and step not in available:
      raise ValueError(
        f"no checkpoint at step {step} in {run.checkpoint_dir}; available: {sorted(available)}"
      )
    if step < 0:
      step, state = ckpt.restore_latest(run.abstract_state)
      if state is None:
        raise FileNotFoundError(
          f"no intact checkpoint left in {run.checkpoint_dir} (damaged "
          "steps were moved to its quarantine/ folder)"
        )
    else:
      state = ckpt.restore(step, run.abstract_state)
  finally:
    ckpt.close()
  return run, run.exp.method.sampling_state(state), step


# The config fields that define what a checkpoint holds and how its samples are decoded.
MODEL_FIELDS = (
  "method",
  "model.size",
  "model.hidden_size",
  "model.depth",
  "model.num_heads",
  "model.mlp_ratio",
  "model.patch_size",
  "model.stage_upsample",
  "model.pos_embed",
  "model.stage_index_embed",
  "model.precondition",
  "decomposition.kind",
  "decomposition.num_stages",
  "decomposition.level_gaps",
  "decomposition.halve_time",
  "decomposition.standardize",
  "data.resolution",
  "data.channels",
  "data.frames",
  "data.num_classes",
  "autoencoder.kind",
)


def check_against_saved_config(config, workdir: str) -> None:
  """ValueError naming every model-defining field where ``config`` differs from the run's
  ``workdir/config.json`` (nothing to check when that file is absent)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  saved.setdefault("model", {}).setdefault("stage_upsample", [])  # older runs: all 1
  given = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))

  def field(tree, name):
    for key in name.split("."):
      if not isinstance(tree, dict) or key not in tree:
        return None
      tree = tree[key]
    return tree

  def flat(value, prefix):
    if isinstance(value, dict):
      return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}

  differ = []
  for name in MODEL_FIELDS:
    a, b = flat(field(saved, name), name), flat(field(given, name), name)
    differ += [
      f"{k}: trained {a.get(k)!r}, given {b.get(k)!r}"
      for k in sorted(set(a) | set(b))
      if json.dumps(a.get(k)) != json.dumps(b.get(k))
    ]
  if differ:
    raise ValueError(
      f"the config does not match the run in {workdir} (its config.json): "
      + "; ".join(differ[:6])
      + (f" (+{len(differ) - 6} more)" if len(differ) > 6 else "")
      + ". Use the config the run was trained with (sampler.* and eval.* may "
      "differ)."
    )


def sample_images(
  run: Run,
  ema_state,
  num: int,
  batch_size: int,
  seed: int,
  sampler_cfg: SamplerConfig | None = None,
  what: str = "sampling",
) -> tuple[np.ndarray, np.ndarray]:
  """``num`` class-cycled samples ``[N, ...]`` in the data space and their labels ``[N]``."""
  sample_fn = make_sample_fn(run.ema_graphdef(), run.exp, sampler_cfg)
  labels = class_cycle_labels(num, run.config.data.num_classes)
  ways = sharding.batch_devices(run.mesh)
  if batch_size % ways and jax.process_index() == 0:
    # The batch sharding rule leaves an indivisible batch unsplit (see docs/compile_check.md).
    logging.warning(
      "%s: the batch of %d does not divide over the %d batch devices, so every device samples "
      "all of it; a multiple of %d splits it",
      what,
      batch_size,
      ways,
      ways,
    )
  progress = Progress(num, what, enabled=jax.process_index() == 0)
  with jax.set_mesh(run.mesh):
    out = generate(sample_fn, ema_state, jax.random.key(seed), labels, batch_size, progress)
  return out["images"], labels


def channel_projection(latents: np.ndarray) -> np.ndarray:
  """Latents ``[N, h, w, c]`` -> uint8 ``[N, h, w, 3]`` (``[N, h, w, 1]`` for one channel).

  The first three channels (or the only one), each stretched per sample from its 1st to 99th
  percentile onto [0, 255]. A look at the structure of latents, not a decoding.
  """
  x = np.asarray(latents, np.float32)[..., :3]
  lo = np.percentile(x, 1, axis=(1, 2), keepdims=True)
  hi = np.percentile(x, 99, axis=(1, 2), keepdims=True)
  y = (x - lo) / np.maximum(hi - lo, 1e-6)
  out = np.clip(np.round(y * 255), 0, 255).astype(np.uint8)
  return out[..., :1] if out.shape[-1] == 2 else out


def to_display(samples: np.ndarray, config) -> np.ndarray:
  """Samples in the data space -> uint8 pictures ``[N, H, W, C]`` (videos ``[N, T, H, W, C]``).

  Pixels in [-1, 1] are quantised; latents (images or clips) are decoded by
  ``config.autoencoder`` when the config names one (`autoencoders.decode_batched`), otherwise
  shown through :func:`channel_projection` (video latents frame by frame).
  """
  from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  if data_lib.source_class(config.data).pixels:
    return reporting.to_uint8(samples)
  samples = np.asarray(samples)
  ae = display_autoencoder(config)
  if ae is not None:
    from dfm_jax import autoencoders  # pylint: disable=g-import-not-at-top

    return reporting.to_uint8(
      autoencoders.decode_batched(ae, samples, int(config.autoencoder.batch_size))
    )
  if samples.ndim == 5:  # video latents: frame by frame
    frames = channel_projection(samples.reshape((-1,) + samples.shape[2:]))
    return frames.reshape(samples.shape[:2] + frames.shape[1:])
  return channel_projection(samples)


_AUTOENCODERS: dict = {}


def display_autoencoder(config):
  """The autoencoder that decodes latent samples for display (``config.autoencoder``), loaded
  once per process; None for pixel data or latents without one. Training and sampling call it
  first, so that missing or damaged weights stop a run before it trains or samples."""
  from dfm_jax import autoencoders, data as data_lib  # pylint: disable=g-import-not-at-top

  if data_lib.source_class(config.data).pixels or not config.autoencoder.kind:
    return None
  key = json.dumps(config.autoencoder.to_dict(), sort_keys=True, default=str)
  if key not in _AUTOENCODERS:
    _AUTOENCODERS[key] = autoencoders.from_config(config.autoencoder)
  return _AUTOENCODERS[key]


def grid_columns(num: int, num_classes: int) -> int:
  """One column per class for class-cycled samples of up to 20 classes, else 10."""
  return num_classes if num_classes <= 20 else min(10, num)


def write_grid(path, pictures: np.ndarray, ncol: int, limit: int = GRID_MAX) -> np.ndarray:
  """Saves the first ``limit`` uint8 pictures ``[N, H, W, C]`` as one PNG grid."""
  grid = reporting.image_grid(pictures[:limit], ncol)
  reporting.save_png(path, grid)
  return grid


def write_preview_grid(path, previews: np.ndarray) -> np.ndarray:
  """uint8 previews ``[S, N, H, W, C]``: one row per sample, one column per stage."""
  s, n = previews.shape[:2]
  tiles = np.transpose(np.asarray(previews), (1, 0, 2, 3, 4)).reshape((s * n,) + previews.shape[2:])
  return write_grid(path, tiles, ncol=s, limit=s * n)


VIDEO_FPS = 8.0  # frame rate of the sample GIFs and MP4s


def write_video_grid(
  base, videos: np.ndarray, ncol: int, limit: int = GRID_MAX, mp4: bool = True
) -> np.ndarray:
  """Saves the first ``limit`` uint8 videos ``[N, T, H, W, C]`` as ``{base}.gif`` (an animated
  grid, ``ncol`` videos per row), ``{base}.mp4`` (the same grid, when ``mp4`` and PyAV has an
  H.264/MPEG-4 encoder) and ``{base}.png`` (a contact sheet: one row per video, its frames left
  to right). Returns the contact sheet, uint8 ``[H', W', C]``."""
  from dfm_jax import video_io  # pylint: disable=g-import-not-at-top

  videos = np.asarray(videos)[:limit]
  grid = video_io.video_grid(videos, ncol)
  _write_file(f"{base}.gif", lambda p: video_io.write_gif(p, grid, fps=VIDEO_FPS))
  if mp4 and video_io.mp4_codec() is not None:
    _write_file(f"{base}.mp4", lambda p: video_io.write_mp4(p, grid, fps=VIDEO_FPS))
  sheet = video_io.contact_sheet(videos)
  if sheet.shape[-1] == 1:  # RGB, as the image grids
    sheet = np.repeat(sheet, 3, axis=-1)
  reporting.save_png(f"{base}.png", sheet)
  return sheet


def _write_file(path: str, write: Callable[[str], object]) -> None:
  """``write(local_path)``, through a local temporary file when ``path`` is remote (gs://)."""
  if not storage.is_remote(path):
    write(path)
    return
  import os  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    write(local)
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(epath.Path(local).read_bytes())


def write_video_preview_grid(base, previews: np.ndarray) -> np.ndarray:
  """uint8 video previews ``[S, N, T, H, W, C]`` -> ``{base}.png``, a contact sheet with one row
  per (sample, stage), stages of a sample adjacent, frames left to right, and ``{base}.gif``,
  one row per sample and one column per stage. Returns the contact sheet."""
  previews = np.asarray(previews)
  s, n = previews.shape[:2]
  rows = np.swapaxes(previews, 0, 1).reshape((n * s,) + previews.shape[2:])
  return write_video_grid(base, rows, ncol=s, limit=n * s, mp4=False)


def save_samples_npz(
  path, pictures: np.ndarray, labels: np.ndarray, latents: np.ndarray | None = None
) -> None:
  """``images`` (uint8 ``[N, H, W, C]``, videos ``[N, T, H, W, C]``), ``labels`` and, for latent
  runs, the ``latents``."""
  arrays = {"images": pictures, "labels": labels}
  if latents is not None:
    arrays["latents"] = np.asarray(latents, np.float32)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    np.savez_compressed(f, **arrays)


def free_base(folder: epath.Path, stem: str) -> epath.Path:
  """``folder/stem``, or ``folder/stem_2``, ``_3``, ... : the first whose ``.json`` (written last
  by every sample run) and ``.npz`` do not exist, so a second run never overwrites a first."""
  n = 1
  while True:
    base = folder / (stem if n == 1 else f"{stem}_{n}")
    if not any((folder / f"{base.name}{ext}").exists() for ext in (".json", ".npz", ".png")):
      return base
    n += 1


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``workdir/samples/final_step{N}.{png,npz,json}`` (videos: also ``.gif`` and, where
  PyAV has an MP4 encoder, ``.mp4``; the PNG is then a contact sheet); returns the .npz path. A
  later run from the same step writes ``final_step{N}_2.*``, ``_3``, ...: nothing is
  overwritten."""
  run, ema, step = restore_ema(config, workdir, int(config.sampler.checkpoint_step))
  if jax.process_index() == 0:
    storage.check_writable(epath.Path(workdir) / "samples", "samples")  # before sampling
  display_autoencoder(config)  # its weights too
  s = config.sampler
  samples, labels = sample_images(run, ema, int(s.num_samples), int(s.batch_size), config.seed + 1)
  pictures = to_display(samples, config)
  base = free_base(epath.Path(workdir) / "samples", f"final_step{step}")
  if jax.process_index() == 0:
    ncol = grid_columns(len(labels), config.data.num_classes)
    if pictures.ndim == 5:
      write_video_grid(base, pictures, ncol)
    else:
      write_grid(f"{base}.png", pictures, ncol)
    save_samples_npz(f"{base}.npz", pictures, labels, samples if _is_latent(config) else None)
    (base.parent / f"{base.name}.json").write_text(
      json.dumps(
        {
          "step": step,
          "num_samples": len(labels),
          "grid_samples": min(len(labels), GRID_MAX),
          "sampler": s.to_dict(),
        },
        indent=2,
        default=str,
      )
    )
  logging.info(
    "wrote %d samples from step %d to %s.{%s}",
    len(labels),
    step,
    base,
    "gif,mp4,png,npz,json" if pictures.ndim == 5 else "png,npz,json",
  )
  return f"{base}.npz"


def _is_latent(config) -> bool:
  from dfm_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  return not data_lib.source_class(config.data).pixels
