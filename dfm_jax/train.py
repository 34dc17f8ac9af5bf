"""The training loop: sharded state, an ahead-of-time compiled step, checkpoints, logs, samples.

Order of work: validate the config -> mesh -> abstract state and its shardings -> jit the
initialiser with ``out_shardings`` -> restore the latest checkpoint (state and data position) if
there is one -> compile the step and log its memory -> loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dfm_jax import checkpoint, data as data_lib, decompose, dit, experiment, generate
from dfm_jax import reporting, sharding
from dfm_jax.train_state import StepSettings, create_train_state, make_optimizer, train_step


class NonFiniteError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient."""


@dataclasses.dataclass
class Run:
  """What the loop, the sampler and the evaluator need about a run."""
  config: ml_collections.ConfigDict
  workdir: str
  exp: experiment.Experiment
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  abstract_state: nnx.State  # ShapeDtypeStruct leaves carrying their shardings
  shardings: nnx.State

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints")

  def ema_graphdef(self) -> nnx.GraphDef:
    return nnx.split(nnx.merge(self.graphdef, self.abstract_state).ema)[0]


def maybe_initialize_distributed(config) -> None:
  d = config.distributed
  if not d.initialize:
    return
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes:
    kwargs["num_processes"] = int(d.num_processes)
  if d.process_id >= 0:
    kwargs["process_id"] = int(d.process_id)
  jax.distributed.initialize(**kwargs)


def _stage_stats(config, exp, workdir) -> decompose.StageStats | None:
  """Per-stage standardisation statistics, estimated once from data and stored in the workdir."""
  if not config.decomposition.standardize:
    return None
  path = os.path.join(workdir, "stage_stats.json")
  if os.path.exists(path):
    with open(path) as f:
      return decompose.StageStats.from_dict(json.load(f))
  it = data_lib.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed + 1)
  batches = (next(it)["image"] for _ in range(int(config.decomposition.stats_batches)))
  stats = decompose.estimate_stats(exp.decomposition, batches)
  checkpoint.save_json(path, stats.to_dict())
  return stats


def setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Run:
  """Validates the config and builds the mesh, the abstract state and its shardings.

  ``devices`` defaults to all devices of all processes.
  """
  devices = list(devices) if devices is not None else jax.devices()
  exp = experiment.from_config(config, len(devices))
  exp = dataclasses.replace(
      exp, decomposition=exp.decomposition.with_stats(_stage_stats(config, exp, workdir)))
  mesh = sharding.make_mesh(experiment.mesh_shape(config, len(devices)), devices)
  abstract = nnx.eval_shape(
      lambda: create_train_state(exp, config.optim, config.total_steps, config.seed))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.axis_rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  return Run(config, workdir, exp, mesh, graphdef, abstract_state, shardings)


def init_state(run: Run) -> nnx.State:
  """Initialises parameters directly into their shardings."""
  config = run.config

  @functools.partial(jax.jit, out_shardings=run.shardings)
  def init():
    state = create_train_state(run.exp, config.optim, config.total_steps, config.seed)
    return nnx.split(state)[1]

  with jax.set_mesh(run.mesh):
    return init()


def compile_step(run: Run, local_batch_shape: dict):
  """Jits the train step with explicit shardings and donation, compiled ahead of time."""
  with jax.set_mesh(run.mesh):
    compiled = lower_step(run, local_batch_shape).compile()
  if jax.process_index() == 0:
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info("train step memory per device: arguments %.1f MiB, outputs %.1f MiB, "
                   "temporaries %.1f MiB", mem.argument_size_in_bytes / 2**20,
                   mem.output_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)
  return compiled


def lower_step(run: Run, local_batch_shape: dict) -> jax.stages.Lowered:
  """The train step jitted with shardings and donation and lowered for
  ``local_batch_shape = {name: (shape, dtype)}``, not yet compiled."""
  config = run.config
  _, lr_schedule = make_optimizer(config.optim, config.total_steps)
  weights = config.flow.stage_weights
  settings = StepSettings(label_dropout=float(config.flow.label_dropout),
                          stage_weights=tuple(weights) if weights is not None else None)
  base_key = jax.random.key(config.seed)

  def step(state, batch):
    key = jax.random.fold_in(base_key, state["optimizer"]["step"][...])
    return train_step(run.graphdef, state, batch, key, exp=run.exp, settings=settings,
                      lr_schedule=lr_schedule)

  batch_sh = sharding.batch_sharding(run.mesh)
  jitted = jax.jit(step, in_shardings=(run.shardings, batch_sh),
                   out_shardings=(run.shardings, sharding.replicated(run.mesh)),
                   donate_argnums=0)
  batch_spec = {k: jax.ShapeDtypeStruct((config.batch_size,) + v[0][1:], v[1], sharding=batch_sh)
                for k, v in local_batch_shape.items()}
  with jax.set_mesh(run.mesh):
    return jitted.lower(run.abstract_state, batch_spec)


class _Signals:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.terminate = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.terminate = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _check_finite(pending: list[tuple[int, dict]]) -> None:
  for step, metrics in pending:
    if int(metrics["nonfinite"]):
      bad = [k for k in ("loss", "grad_norm") if not np.isfinite(float(metrics[k]))]
      raise NonFiniteError(
          f"non-finite {' and '.join(bad) or 'values'} at step {step} "
          f"({', '.join(f'{k}={float(metrics[k])}' for k in ('loss', 'grad_norm'))}); the update "
          f"was not applied and no checkpoint was written after it")


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> nnx.State:
  """Trains (or resumes) to ``config.total_steps``; returns the final state."""
  run = setup(config, workdir, devices)
  os.makedirs(workdir, exist_ok=True)
  checkpoint.save_json(os.path.join(workdir, "config.json"), config.to_dict())
  if jax.process_index() == 0:
    logging.info("configuration:\n%s", config)
    logging.info("model parameters:\n%s", dit.parameter_summary(
        nnx.merge(run.graphdef, run.abstract_state).model))
  data_iter = data_lib.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  ckpt = checkpoint.Checkpointer(run.checkpoint_dir, keep=config.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    logging.info("resuming from checkpoint at step %d", start)
    state = ckpt.restore(start, run.abstract_state, data_iter)
    if start >= config.total_steps:
      logging.info("checkpoint step %d >= total_steps %d: nothing to train", start,
                   config.total_steps)
      ckpt.close()
      return state
  else:
    start = 0
    state = init_state(run)
  first = next(data_iter)
  compiled = compile_step(run, {k: (v.shape, v.dtype) for k, v in first.items()})
  writer = reporting.create_writer(workdir)
  sample_fn = generate.make_sample_fn(run.ema_graphdef(), run.exp, previews=True)
  grid_labels = generate.class_cycle_labels(config.num_grid_samples, config.data.num_classes)
  signals = _Signals()
  pending: list[tuple[int, dict]] = []
  t_last, step_last = time.time(), start
  batch_local = first
  try:
    for step in range(start, config.total_steps):
      if batch_local is None:
        batch_local = next(data_iter)
      batch = sharding.global_batch(batch_local, run.mesh)
      batch_local = None
      state, metrics = compiled(state, batch)
      done = step + 1
      pending.append((done, metrics))
      last = done == config.total_steps
      if config.stop_on_nonfinite and (done % config.log_every == 0 or last or
                                       done % config.checkpoint_every == 0 or
                                       signals.terminate):
        _check_finite(pending)
      if done % config.log_every == 0 or last:
        now = time.time()
        rate = (done - step_last) / max(now - t_last, 1e-9)
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(steps_per_sec=rate, images_per_sec=rate * config.batch_size)
        writer.write_scalars(done, scalars)
        if jax.process_index() == 0:
          print(f"step {done}/{config.total_steps}  loss {scalars['loss']:.4f}  "
                f"{rate:.2f} steps/s  {rate * config.batch_size:.0f} img/s  "
                f"ETA {_format_eta((config.total_steps - done) / max(rate, 1e-9))}", flush=True)
        t_last, step_last = now, done
        pending = []
      if done % config.checkpoint_every == 0 or last or signals.terminate:
        ckpt.save(done, state, data_iter)
      if done % config.sample_every == 0:
        _write_samples(run, sample_fn, state, grid_labels, done, writer)
      if signals.terminate:
        logging.warning("SIGTERM: saved a checkpoint at step %d, exiting", done)
        break
  finally:
    ckpt.close()
    writer.flush()
    signals.restore()
  return state


def _write_samples(run: Run, sample_fn, state, labels, step: int, writer) -> None:
  key = jax.random.fold_in(jax.random.key(run.config.seed + 7), step)
  with jax.set_mesh(run.mesh):
    out = jax.device_get(sample_fn(state["ema"], key, jnp.asarray(labels)))
  ncol = run.config.data.num_classes
  folder = os.path.join(run.workdir, "samples")
  if jax.process_index() == 0:
    grid = generate.write_sample_grid(os.path.join(folder, f"step_{step:07d}.png"),
                                      out["images"], ncol=ncol)
    pv = out["previews"][:, :min(len(labels), ncol)]
    preview = generate.write_preview_grid(
        os.path.join(folder, f"step_{step:07d}_stages.png"), pv)
    writer.write_images(step, {"samples": grid, "stage_previews": preview})
