"""Command line: ``python -m dfm_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]``
(installed: ``dfm-train`` and ``dfm-sample``; a bare ``--config=NAME`` is a shipped config).

Modes: ``train`` (default; re-running resumes from the newest intact checkpoint), ``sample``
(pictures and arrays from the EMA weights of a checkpoint) and ``eval`` (the metrics of
``eval.metrics``). Override any config field with ``--config.FIELD=VALUE``. Sample and eval read
no training data.

Exit codes: 0 done; 2 a bad flag, config file, config value or ``--workdir`` (one ``error: ...``
line, before any heavy work);
1 an error, reported as one ``error: ...`` line (``--debug`` or
``DFM_JAX_DEBUG=1`` shows the traceback); 75 (``EX_TEMPFAIL``) stopped by SIGTERM or Ctrl-C
after saving a checkpoint: run the same command again to resume (schedulers may requeue on it);
130 interrupted by Ctrl-C outside training (nothing to save).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dfm_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs, samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_bool("debug", False, "Show tracebacks of errors (also: DFM_JAX_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])


def expected_errors() -> tuple[type[BaseException], ...]:
  """Errors reported as one line: bad configs, inputs, workdirs and checkpoints."""
  return (
    ValueError,
    OSError,
    errors.CheckpointSaveError,
    errors.CheckpointCorruptError,
    errors.WorkdirLockedError,
    errors.NonFiniteError,
  )


def run_mode(config, workdir: str, mode: str):
  """Runs one mode in-process (also the notebook's entry point)."""
  from dfm_jax import run as run_lib, storage  # pylint: disable=g-import-not-at-top

  run_lib.maybe_initialize_distributed(config)
  storage.enable_compilation_cache(config)
  if mode == "train":
    from dfm_jax import train  # pylint: disable=g-import-not-at-top

    return train.train(config, workdir)
  if mode == "sample":
    from dfm_jax import sampling  # pylint: disable=g-import-not-at-top

    return sampling.sample_mode(config, workdir)
  from dfm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  return evaluate.eval_mode(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from dfm_jax import cli_errors  # pylint: disable=g-import-not-at-top

  debug = FLAGS.debug or cli_errors.debug_requested()
  from dfm_jax import storage  # pylint: disable=g-import-not-at-top

  try:
    storage.preflight(FLAGS.config, workdir=FLAGS.workdir)  # seconds, before any heavy work
    run_mode(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except errors.Preempted as e:
    logging.warning("%s", e)
    sys.exit(errors.EXIT_PREEMPTED)
  except KeyboardInterrupt:
    if debug:
      raise
    print("interrupted", file=sys.stderr)
    sys.exit(errors.EXIT_INTERRUPTED)
  except expected_errors() as e:
    if debug:
      raise
    print(f"error: {_message(e)}", file=sys.stderr, flush=True)
    if isinstance(e, errors.CheckpointSaveError):
      # The failed save's abandoned write tasks would print tracebacks at interpreter shutdown,
      # after this line; the lock is released and every file closed, so leave at once.
      logging.flush()
      sys.stdout.flush()
      os._exit(errors.EXIT_ERROR)  # pylint: disable=protected-access
    sys.exit(errors.exit_code(e))


def _message(e: BaseException) -> str:
  """The error's text; a heading with a single ``- item`` under it reads as one line."""
  lines = str(e).strip().splitlines()
  if len(lines) == 2 and lines[0].endswith(":") and lines[1].lstrip().startswith("- "):
    return f"{lines[0]} {lines[1].lstrip()[2:]}"
  return "\n".join(lines)


class _QuietLibraries(std_logging.Filter):
  """Keeps the checkpoint and input libraries' per-operation INFO lines out of the log, and the
  tracebacks of the errors they log and hand on (a failed background save reaches the caller and
  is reported as one ``error: ...`` line; ``--debug`` keeps the traceback)."""

  def filter(self, record):
    if record.name == "asyncio" and "never retrieved" in record.getMessage():
      # an abandoned write of a failed save (reported as the error line); --debug keeps it
      return "orbax" not in record.getMessage() or _debug()
    noisy = any(name in record.pathname for name in ("orbax", "grain", "tensorstore"))
    if noisy and record.exc_info and not _debug():
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING or not noisy


def _debug() -> bool:
  flag = FLAGS.is_parsed() and FLAGS.debug
  from dfm_jax import cli_errors  # pylint: disable=g-import-not-at-top

  return bool(flag) or cli_errors.debug_requested()


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with flag and config-file problems (missing file, syntax error, unknown
  field, wrong type) and a ``--workdir`` that is not a folder reported as one ``error: ...`` line
  and exit code 2."""
  from dfm_jax import cli_errors, storage  # pylint: disable=g-import-not-at-top

  rest = cli_errors.parse_flags(FLAGS, argv)
  workdir = FLAGS.workdir
  if not workdir.strip():
    print("error: --workdir is empty; name the run's folder (local or gs://)", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
  if not storage.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
    print(f"error: --workdir {workdir} is a file, not a folder", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
  return rest


def _quiet_unraisable(unraisable) -> None:
  """Drops the "Event loop is closed" noise that Orbax's background thread can print after a
  damaged checkpoint failed to restore (the run goes on with the previous step); anything else
  goes to Python's default hook."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
    return
  sys.__unraisablehook__(unraisable)


def run():
  from dfm_jax import cli_errors  # pylint: disable=g-import-not-at-top

  cli_errors.sigterm_as_interrupt()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if not cli_errors.debug_requested():
    sys.unraisablehook = _quiet_unraisable
  app.run(main, flags_parser=parse_flags)


def _command(mode: str) -> None:
  """A console command that is ``python -m dfm_jax.main --mode=MODE``."""
  if any(a == "--mode" or a.startswith("--mode=") for a in sys.argv[1:]):
    print(f"error: this command always runs --mode={mode}; drop --mode", file=sys.stderr)
    sys.exit(2)
  sys.argv.insert(1, f"--mode={mode}")
  run()


def train_command() -> None:
  """``dfm-train --config=NAME --workdir=DIR``: train (resumes from the newest checkpoint)."""
  _command("train")


def sample_command() -> None:
  """``dfm-sample --config=NAME --workdir=DIR``: samples from a workdir's checkpoint."""
  _command("sample")


if __name__ == "__main__":
  run()
