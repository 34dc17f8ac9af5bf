"""The errors a run reports as one line, and the command lines' exit codes.

Each is raised by the module named in its comment; the command lines (``dfm_jax.main``,
``dfm_jax.encode``, ``dfm_jax.fid``, ``dfm_jax.compile_check``) print ``error: <message>`` and
exit with :func:`exit_code` instead of a traceback (``--debug`` keeps it).
"""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_USAGE = 2  # a bad flag, config file, config value, path or credentials
EXIT_PREEMPTED = 75  # SIGTERM: a checkpoint was saved; re-running resumes
EXIT_INTERRUPTED = 130  # Ctrl-C


# raised by config_schema
class InvalidConfigError(ValueError):
  """A config the run refuses before any heavy work: one ``  - `` line per problem. The command
  lines report it as one ``error: ...`` line and exit 2, like a bad flag."""

  def __init__(self, problems: list[str]):
    super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
    self.problems = list(problems)


# raised by storage
class CloudAccessError(OSError):
  """A ``gs://`` path that cannot be reached from here (no credentials)."""


# raised by checkpoint
class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; ``step`` is the step that was lost."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


# raised by checkpoint
class CheckpointCorruptError(RuntimeError):
  """A saved step is damaged, truncated or incomplete. ``reason`` is a short slug used in the
  quarantine directory name (``checksum``, ``unreadable``, ``metadata``, ``manifest``,
  ``data-iter``); the message names the step and what is wrong."""

  def __init__(self, step: int, reason: str, detail: str):
    super().__init__(f"checkpoint step {step} is damaged ({reason}): {detail}")
    self.step, self.reason, self.detail = step, reason, detail


# raised by checkpoint
class CheckpointMismatchError(ValueError):
  """The checkpoint is intact but was written for a different model (config or code)."""


# raised by init_from
class InitFromMismatchError(ValueError):
  """The source checkpoint's model cannot initialise this one (other width, depth, ...)."""


# raised by data.corrupt
class CorruptRecordError(ValueError):
  """An image file or record that cannot be decoded; the message names it."""


# raised by workdir_lock
class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir; the message names its host, pid and start time."""

  def __init__(self, message: str, holder: dict | None = None):
    super().__init__(message)
    self.holder = holder or {}


# raised by train
class NonFiniteError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient."""


# raised by train
class Preempted(Exception):
  """SIGTERM or Ctrl-C: a checkpoint was saved at ``step``; re-running the command resumes."""

  def __init__(self, step: int, signame: str):
    super().__init__(
      f"{signame}: saved a checkpoint at step {step}; re-run the same command to resume"
    )
    self.step = step


# raised by fid
class InputError(Exception):
  """A path that cannot be turned into a set of images."""


# raised by compile_check
class CompileCheckError(Exception):
  """A problem reported as one line (unknown topology, no libtpu, bad mesh)."""


# Bad input rather than a failure: the command lines exit 2 on these, as on a bad flag.
USAGE_ERRORS = (InvalidConfigError, CloudAccessError)


def exit_code(e: BaseException) -> int:
  """The exit code of a command line that stops on ``e``."""
  if isinstance(e, Preempted):
    return EXIT_PREEMPTED
  if isinstance(e, KeyboardInterrupt):
    return EXIT_INTERRUPTED
  return EXIT_USAGE if isinstance(e, USAGE_ERRORS) else EXIT_ERROR
