"""The training loop: sharded state, an ahead-of-time compiled step, checkpoints, logs, samples.

Order of work: validate the config (``run.setup``) -> lock the workdir -> restore the newest
intact checkpoint (state and data position; the config is checked against it before anything is
written) or initialise directly into the shardings (then, with ``config.init_from``, take the
weights of another run: :mod:`dfm_jax.init_from`) -> compile the step and log its memory ->
loop. Every ``log_every`` steps the metrics averaged over the interval, the step time and the
time spent waiting for data go to the log and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from dfm_jax import checkpoint, data as data_lib, dit, reporting, sampling, sharding
from dfm_jax import config_defaults, hardware, init_from, storage, workdir_lock
from dfm_jax.errors import NonFiniteError, Preempted
from dfm_jax.progress import format_eta
from dfm_jax.run import Run, init_state, maybe_initialize_distributed, setup, stats_batches
from dfm_jax.train_state import make_optimizer, train_step

__all__ = [
  "NonFiniteError",
  "Preempted",
  "Run",
  "compile_step",
  "lower_step",
  "maybe_initialize_distributed",
  "setup",
  "train",
]


def compile_step(run: Run, local_batch_shape: dict):
  """Jits the train step with explicit shardings and donation, compiled ahead of time."""
  start = time.perf_counter()
  with jax.set_mesh(run.mesh):
    compiled = lower_step(run, local_batch_shape).compile()
  if jax.process_index() == 0:
    logging.info("train step compiled in %.1f s", time.perf_counter() - start)
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info(
        "train step memory per device: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB",
        mem.argument_size_in_bytes / 2**20,
        mem.output_size_in_bytes / 2**20,
        mem.temp_size_in_bytes / 2**20,
      )
  return compiled


def lower_step(run: Run, local_batch_shape: dict) -> jax.stages.Lowered:
  """The train step jitted with shardings and donation and lowered for
  ``local_batch_shape = {name: (shape, dtype)}``, not yet compiled."""
  config = run.config
  _, lr_schedule = make_optimizer(config.optim, config.total_steps)
  accum = int(config.optim.grad_accum_steps)
  base_key = jax.random.key(config.seed)

  def step(state, batch):
    key = jax.random.fold_in(base_key, state["optimizer"]["step"][...])
    return train_step(
      run.graphdef, state, batch, key, exp=run.exp, lr_schedule=lr_schedule, grad_accum_steps=accum
    )

  batch_sh = sharding.batch_sharding(run.mesh)
  jitted = jax.jit(
    step,
    in_shardings=(run.shardings, batch_sh),
    out_shardings=(run.shardings, sharding.replicated(run.mesh)),
    donate_argnums=0,
  )
  batch_spec = {
    k: jax.ShapeDtypeStruct((config.batch_size,) + v[0][1:], v[1], sharding=batch_sh)
    for k, v in local_batch_shape.items()
  }
  with jax.set_mesh(run.mesh):
    return jitted.lower(run.abstract_state, batch_spec)


class _Signals:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a stop the loop acts on after a step.

  On a multi-process run a signal reaches the processes at different steps (or only one of
  them), but a checkpoint save is collective: every process must save the same step. So the
  processes act only on an agreed stop: every ``every`` steps they all-gather their flags, and a
  flag raised anywhere stops all of them after that step.
  """

  _CODES = {None: 0, "SIGTERM": 1, "SIGINT": 2}

  def __init__(self, every: int = 1):
    self.received: str | None = None  # this process's signal
    self.every = every if jax.process_count() > 1 else 1
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def agreed(self, step: int) -> str | None:
    """The signal all processes stop for after ``step`` (None: go on); the same answer on every
    process (a collective on multi-process runs, at the steps that are multiples of ``every``)."""
    if jax.process_count() == 1:
      return self.received
    if step % self.every:
      return None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    codes = multihost_utils.process_allgather(np.int32(self._CODES[self.received]))
    code = int(np.max(codes))
    return next((name for name, c in self._CODES.items() if c == code and c), None)

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _check_finite(pending: list[tuple[int, dict]]) -> None:
  for step, metrics in pending:
    if int(metrics["nonfinite"]):
      bad = [k for k in ("loss", "grad_norm") if not np.isfinite(float(metrics[k]))]
      raise NonFiniteError(
        f"non-finite {' and '.join(bad) or 'values'} at step {step} "
        f"({', '.join(f'{k}={float(metrics[k])}' for k in ('loss', 'grad_norm'))}); the update "
        f"was not applied and no checkpoint was written after it"
      )


def _interval_means(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """Each metric averaged over the steps of a logging interval."""
  values = jax.device_get([m for _, m in pending])
  return {k: float(np.mean([v[k] for v in values])) for k in values[0] if k != "nonfinite"}


def _write_config(workdir: str, config) -> None:
  """Writes ``config.json``; a different earlier config is kept as ``config.<time>.json``."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "config.json"
  new = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
  if path.exists():
    old = json.loads(path.read_text())
    if old == new:
      return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path.rename(path.parent / f"config.{stamp}.json")
  storage.write_json(path, new)


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> nnx.State:
  """Trains (or resumes) to ``config.total_steps``; returns the final state.

  Raises :class:`Preempted` after saving when SIGTERM or Ctrl-C arrives, ``NonFiniteError`` on
  a non-finite step and ``checkpoint.CheckpointSaveError`` when a save fails.
  """
  run = setup(config, workdir, devices)
  if config.eval.every:  # the evaluations during training: refuse a bad setting now, not then
    from dfm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

    evaluate.check_eval_config(config)
  sampling.display_autoencoder(config)  # weights fetched and checked now, not at the first grid
  lock = _acquire_lock(workdir)
  try:
    return _train_locked(run)
  finally:
    lock.release()


def _acquire_lock(workdir: str) -> workdir_lock.Lock:
  """Takes the workdir lock with Ctrl-C and SIGTERM deferred until it is held, so that a signal
  cannot land between the lock file's creation and the ``finally`` that removes it."""
  signals = (signal.SIGINT, signal.SIGTERM)
  if threading.current_thread() is not threading.main_thread() or any(
    signal.getsignal(s) is None for s in signals
  ):
    return workdir_lock.acquire(workdir, process_index=jax.process_index())
  interrupted = []
  previous = {
    s: signal.signal(s, lambda signum, frame: interrupted.append(signum)) for s in signals
  }
  try:
    lock = workdir_lock.acquire(workdir, process_index=jax.process_index())
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if interrupted:
    lock.release()
    raise KeyboardInterrupt
  return lock


def _train_locked(run: Run) -> nnx.State:
  config, workdir = run.config, run.workdir
  data_iter = data_lib.make_train_iterator(
    config.data,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  ckpt = checkpoint.Checkpointer(
    run.checkpoint_dir, keep=config.keep_checkpoints, facts=run.checkpoint_facts()
  )
  try:
    start, state = ckpt.restore_latest(run.abstract_state, data_iter)
    source = None
    if config.init_from:
      if start is None:  # checked before anything is written or trained
        source = init_from.prepare(config.init_from, run)
      else:
        logging.info("workdir has its own checkpoint: config.init_from is not used")
    _write_config(workdir, config)  # only once the checkpoint accepted this config
    if start is not None and start >= config.total_steps:
      logging.info(
        "checkpoint step %d >= total_steps %d: nothing to train", start, config.total_steps
      )
      return state
    if start is None:
      start, state = 0, init_state(run)
      state = _init_data_stats(run, state)
      if source is not None:
        state = init_from.apply(source, run, state)
    else:
      logging.info("resuming from checkpoint at step %d", start)
    try:
      return _loop(run, ckpt, data_iter, state, start)
    except OSError as e:  # logs or a sample grid on a disk that filled up
      if not checkpoint.disk_full(e):
        raise
      ckpt.wait()  # a save still in flight reports its own failure first
      raise ckpt.write_error(f"writing the run's logs and samples to {workdir}", e) from e
  finally:
    ckpt.close()


def _init_data_stats(run: Run, state: nnx.State) -> nnx.State:
  """Sets the model's per-stage data statistics (preconditioning) from training batches."""
  if not run.exp.model.precondition:
    return state
  from dfm_jax import precondition  # pylint: disable=g-import-not-at-top

  stats = run.exp.method.data_stats(stats_batches(run.config))
  logging.info(
    "per-stage data statistics for preconditioning: mean %s, std %s",
    np.round(stats.mean, 4).tolist(),
    np.round(stats.std, 4).tolist(),
  )
  train_state = nnx.merge(run.graphdef, state)
  precondition.set_stats(train_state, stats)
  return jax.device_put(nnx.split(train_state)[1], run.shardings)


def _log_start(run: Run, writer: reporting.MetricWriter) -> None:
  if jax.process_index() != 0:
    return
  model = nnx.merge(run.graphdef, run.abstract_state).model
  summary = dit.parameter_summary(model)
  changed = config_defaults.differences(run.config)
  logging.info(
    "config: %d field(s) differ from the defaults (the full config: %s/config.json)%s",
    len(changed),
    run.workdir,
    "".join(f"\n  {line}" for line in changed),
  )
  logging.info("model parameters:\n%s", summary)
  writer.write_text(0, {"config": f"```\n{run.config}\n```", "parameters": f"```\n{summary}\n```"})
  writer.write_hparams(run.config, {"parameters": dit.count_parameters(model)})


@dataclasses.dataclass(eq=False)
class _Periodic:
  """Work done after every ``every`` steps (0: never) and, with ``at_end``, after the last."""

  every: int
  action: Callable[[int, nnx.State], None]
  at_end: bool = False

  def due(self, done: int, last: bool) -> bool:
    return bool(self.every and done % self.every == 0) or (last and self.at_end)


class _IntervalLog:
  """Each logging interval's metrics (averaged over its steps), step time, data wait and model
  FLOP rate, to TensorBoard and as one console line."""

  def __init__(self, run: Run, writer: reporting.MetricWriter, start: int):
    config = run.config
    self.config, self.writer = config, writer
    # Model FLOPs per device per step (dit.DiTConfig.train_flops_per_sample) and the chip's peak.
    self.flops = config.batch_size * run.exp.model.train_flops_per_sample() / run.mesh.devices.size
    self.peak = hardware.peak_tflops(run.mesh.devices.flat[0].device_kind)
    self.pending: list[tuple[int, dict]] = []
    self.data_wait, self.t_last, self.step_last = 0.0, time.time(), start

  def __call__(self, done: int, state) -> None:
    del state
    config = self.config
    jax.block_until_ready(self.pending[-1][1])
    now = time.time()
    steps = done - self.step_last
    elapsed = max(now - self.t_last, 1e-9)
    scalars = _interval_means(self.pending)
    scalars.update(
      {
        "time/step_s": elapsed / steps,
        "time/data_wait_s": self.data_wait / steps,
        "steps_per_sec": steps / elapsed,
        "images_per_sec": steps * config.batch_size / elapsed,
        "perf/tflops_per_device": self.flops * steps / elapsed / 1e12,
      }
    )
    if self.peak:
      scalars["perf/mfu"] = scalars["perf/tflops_per_device"] / self.peak
    self.writer.write_scalars(done, scalars)
    if jax.process_index() == 0:
      rate = steps / elapsed
      print(
        f"step {done}/{config.total_steps}  loss {scalars['loss']:.4f}  "
        f"grad norm {scalars.get('grad_norm', float('nan')):.3g}  "
        f"{rate:.2f} steps/s  step {1e3 * elapsed / steps:.0f} ms (data "
        f"{1e3 * self.data_wait / steps:.0f} ms)  {scalars['perf/tflops_per_device']:.3g} TFLOP/s"
        + (f" (MFU {100 * scalars['perf/mfu']:.1f}%)" if self.peak else "")
        + f"  ETA {format_eta((config.total_steps - done) / max(rate, 1e-9))}",
        flush=True,
      )
    self.t_last, self.step_last, self.data_wait = now, done, 0.0
    self.pending = []


class _Profile:
  """A profiler trace of steps ``profile_steps = (first, last)`` into ``workdir/profile``."""

  def __init__(self, steps, workdir: str):
    self.steps, self.workdir, self.trace_dir = tuple(int(v) for v in steps), workdir, None

  def before(self, step: int) -> None:
    if self.steps and step + 1 == self.steps[0]:
      self.trace_dir = _trace_dir(self.workdir)
      jax.profiler.start_trace(self.trace_dir)

  def after(self, done: int, state) -> None:
    if self.steps and done == self.steps[-1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      _publish_trace(self.trace_dir, self.workdir)
      logging.info(
        "profiler trace of steps %d-%d written to %s/profile", self.steps[0], done, self.workdir
      )


def _loop(run: Run, ckpt: checkpoint.Checkpointer, data_iter, state, start: int) -> nnx.State:
  config, workdir = run.config, run.workdir
  first = next(data_iter)
  compiled = compile_step(run, {k: (v.shape, v.dtype) for k, v in first.items()})
  writer = reporting.create_writer(workdir)
  _log_start(run, writer)
  sample_fn = sampling.make_sample_fn(run.ema_graphdef(), run.exp, previews=True)
  grid_labels = sampling.class_cycle_labels(config.num_grid_samples, config.data.num_classes)
  profile = _Profile(config.profile_steps, workdir)
  signals = _Signals(int(config.preemption_check_every))
  log = _IntervalLog(run, writer, start)
  # After each step, in this order: a stop on a non-finite step before anything is logged or
  # saved; the log; the checkpoint; sample grids and evaluations (which read the saved state).
  log_hook = _Periodic(config.log_every, log, at_end=True)
  save = _Periodic(config.checkpoint_every, lambda n, s: ckpt.save(n, s, data_iter), at_end=True)
  hooks = [
    log_hook,
    save,
    _Periodic(
      config.sample_every,
      lambda done, s: _write_samples(run, sample_fn, s, grid_labels, done, writer),
    ),
    _Periodic(int(config.eval.every), lambda done, s: _small_eval(run, s, done, writer)),
  ]
  batch_local = first
  failure = None
  try:
    for step in range(start, config.total_steps):
      profile.before(step)
      if batch_local is None:
        t_data = time.time()
        batch_local = next(data_iter)
        log.data_wait += time.time() - t_data
      batch = sharding.global_batch(batch_local, run.mesh)
      batch_local = None
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, metrics = compiled(state, batch)
      done = step + 1
      log.pending.append((done, metrics))
      last = done == config.total_steps
      stop = signals.agreed(done)
      profile.after(done, state)
      due = [h for h in hooks if h.due(done, last) or (stop and h is save)]  # a stop saves
      if config.stop_on_nonfinite and (log_hook in due or save in due):
        _check_finite(log.pending)
      for hook in hooks:
        if hook in due:
          hook.action(done, state)
        if hook is save:
          ckpt.check()  # a finished asynchronous save that failed, now
      if stop:
        ckpt.wait()
        logging.warning("%s: saved a checkpoint at step %d, exiting", stop, done)
        raise Preempted(done, stop)
  except BaseException as e:
    failure = e
    raise
  finally:
    signals.restore()
    try:
      writer.close()
    except OSError as e:
      if failure is None:
        raise
      # A full disk also fails the writer's last flush; that must not hide the first error.
      logging.warning("TensorBoard's last events were not written: %s", e)
  return state


def _trace_dir(workdir: str) -> str:
  """Where the profiler writes: ``workdir/profile``, or a local temporary folder for a ``gs://``
  workdir (the profiler's own GCS client does not go through etils.epath)."""
  if not storage.is_remote(workdir):
    return str(epath.Path(workdir) / "profile")
  return tempfile.mkdtemp(prefix="dfm_profile_")


def _publish_trace(trace_dir: str, workdir: str) -> None:
  """Copies a trace written to a temporary folder into ``workdir/profile`` (through epath)."""
  if not storage.is_remote(workdir):
    return
  try:
    storage.copy_tree(trace_dir, epath.Path(workdir) / "profile")
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)


def _write_samples(run: Run, sample_fn, state, labels, step: int, writer) -> None:
  key = jax.random.fold_in(jax.random.key(run.config.seed + 7), step)
  with jax.set_mesh(run.mesh):
    out = jax.device_get(sample_fn(run.exp.method.sampling_state(state), key, jnp.asarray(labels)))
  if jax.process_index() != 0:
    return
  config = run.config
  ncol = sampling.grid_columns(len(labels), config.data.num_classes)
  folder = epath.Path(run.workdir) / "samples"
  samples = sampling.to_display(out["images"], config)
  pv = out["previews"][:, : min(len(labels), ncol)]
  pictures = sampling.to_display(pv.reshape((-1,) + pv.shape[2:]), config)
  pictures = pictures.reshape(pv.shape[:2] + pictures.shape[1:])
  if samples.ndim == 5:  # videos [N, T, H, W, C]: GIF grids and PNG contact sheets
    grid = sampling.write_video_grid(folder / f"step_{step:07d}", samples, ncol, mp4=False)
    preview = sampling.write_video_preview_grid(folder / f"step_{step:07d}_stages", pictures)
  else:
    grid = sampling.write_grid(folder / f"step_{step:07d}.png", samples, ncol)
    preview = sampling.write_preview_grid(folder / f"step_{step:07d}_stages.png", pictures)
  writer.write_images(step, {"samples": grid, "stage_previews": preview})


def _small_eval(run: Run, state, step: int, writer) -> None:
  """``eval.train_num_samples`` samples scored with the configured metrics, logged as eval/*."""
  from dfm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  config = run.config
  num = int(config.eval.train_num_samples)
  sample_fn = sampling.make_sample_fn(run.ema_graphdef(), run.exp)
  labels = sampling.class_cycle_labels(num, config.data.num_classes)
  weights = run.exp.method.sampling_state(state)
  with jax.set_mesh(run.mesh):
    samples = sampling.generate(
      sample_fn, weights, jax.random.key(config.seed + 3), labels, int(config.eval.batch_size)
    )["images"]
  if jax.process_index() != 0:
    return
  result = evaluate.score_samples(config, samples, labels, progress=False)
  numbers = {
    f"eval/{k}": v
    for k, v in result.items()
    if isinstance(v, (int, float)) and v is not None and not k.startswith("num_")
  }
  writer.write_scalars(step, numbers)
