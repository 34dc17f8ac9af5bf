"""Flag parsing for the command lines (``dfm_jax.main``, ``dfm_jax.encode``) with problems in the
flags or the config file reported as one ``error: ...`` line and exit code 2.

``ml_collections`` reports a config file it cannot open over several lines, and without
``--config.X`` overrides only on the first use of the config (deep inside the run); an unknown
field comes back as the repr of a repr, and an exception raised by the file's ``get_config`` (an
unknown ``:variant``, say) with its whole traceback. Here each becomes one line, before anything
runs.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import signal
import sys
from pathlib import Path

import ml_collections
from absl import flags

from dfm_jax.errors import EXIT_USAGE


def sigterm_as_interrupt() -> None:
  """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so a run stopped while it starts up
  unwinds (releasing its workdir lock) instead of dying with the lock held; the training loop
  installs its own handler (save, then exit 75) for the steps themselves."""

  def handler(signum, frame):
    del signum, frame
    raise KeyboardInterrupt("SIGTERM")

  signal.signal(signal.SIGTERM, handler)


def debug_requested(argv: list[str] | None = None) -> bool:
  """The one debug switch: ``--debug`` on the command line (``argv``, default ``sys.argv``) or
  ``DFM_JAX_DEBUG`` set to anything but '' or '0'; errors then show their tracebacks."""
  argv = sys.argv if argv is None else argv
  return "--debug" in argv or os.environ.get("DFM_JAX_DEBUG", "") not in ("", "0")


def parse_flags(
  flag_values: flags.FlagValues, argv: list[str], config_flag: str = "config"
) -> list[str]:
  """``flag_values(argv)``; on a bad flag or config file prints one line and exits 2. A config
  named without a folder (``--config=imagenet512:fm``) is one of the shipped configs."""
  hint = False
  try:
    argv = resolve_config_names(argv, config_flag)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  try:
    rest = flag_values(argv)
    _raise_deferred_load_error(flag_values, config_flag)
    _check_config_type(flag_values, config_flag, argv)
    return rest
  except _ConfigTypeError as e:
    message = str(e)
  except flags.Error as e:
    if debug_requested(argv):
      raise
    message = _get_config_error(str(e), _flag_value(argv, config_flag))
    hint = message is None
    message = message or str(e)
  except (KeyError, AttributeError) as e:  # ml_collections: unknown field, maybe with a hint
    if debug_requested(argv):
      raise
    message = _unknown_field(e, argv, config_flag)
    if "has no attribute 'get_config" in message:
      message = f"config {_flag_value(argv, config_flag)} defines no get_config() function"
  except (OSError, SyntaxError, ImportError, TypeError, ValueError) as e:
    if debug_requested(argv):
      raise
    message = _load_error(e)
  except Exception as e:  # pylint: disable=broad-except  # raised by the config file's own code
    if debug_requested(argv):
      raise
    message = f"config {_flag_value(argv, config_flag)}: {type(e).__name__}: {e}"
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  if hint:
    print("Pass --helpfull to see the flags.", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def shipped_configs() -> Path | None:
  """The folder of the shipped configs: ``dfm_jax.configs`` in an installed wheel, else the
  repository's ``configs/`` beside the package."""
  spec = importlib.util.find_spec("dfm_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return Path(list(spec.submodule_search_locations)[0])
  repo = Path(__file__).resolve().parents[1] / "configs"
  return repo if (repo / "default.py").is_file() else None


def resolve_config_names(argv: list[str], config_flag: str = "config") -> list[str]:
  """``argv`` with ``--config=NAME[:ARG]`` (a bare name that is not a file here) replaced by the
  shipped config's path; ValueError for a bare name that is neither."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f"--{config_flag}="):
      prefix, value = f"--{config_flag}=", arg.split("=", 1)[1]
    elif i > 0 and out[i - 1] == f"--{config_flag}":
      prefix, value = "", arg
    else:
      continue
    path, colon, variant = value.partition(":")
    if not path or os.sep in path or "/" in path or os.path.exists(path):
      continue
    name = path[:-3] if path.endswith(".py") else path
    folder = shipped_configs()
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") if folder else []
    if name not in names:
      raise ValueError(
        f"config {path!r} is neither a file nor a shipped config ({', '.join(names)})"
      )
    out[i] = f"{prefix}{folder / (name + '.py')}{colon}{variant}"
  return out


class _ConfigTypeError(Exception):
  pass


def _check_config_type(flag_values: flags.FlagValues, name: str, argv: list[str]) -> None:
  """A config file's ``get_config`` must return a ConfigDict (a dict has no typed fields and no
  overrides)."""
  if name not in flag_values:
    return
  value = flag_values[name].value
  if value is not None and not isinstance(value, ml_collections.ConfigDict):
    raise _ConfigTypeError(
      f"config {_flag_value(argv, name)}: get_config() must return an "
      f"ml_collections.ConfigDict, got {type(value).__name__}"
    )


def _raise_deferred_load_error(flag_values: flags.FlagValues, name: str) -> None:
  """ml_collections keeps a config file it could not load as a placeholder that raises on first
  use; raise its error now."""
  if name not in flag_values:
    return
  error = getattr(flag_values[name].value, "__dict__", {}).get("_error")
  if isinstance(error, BaseException):
    raise error


_TRACEBACK = "Traceback (most recent call last):"


def _flag_value(argv: list[str], name: str) -> str:
  """The last value of ``--name=V`` or ``--name V`` in ``argv``."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  values += [v for a, v in zip(argv, argv[1:]) if a == f"--{name}"]
  return values[-1] if values else "?"


def _get_config_error(message: str, spec: str) -> str | None:
  """``config PATH[:ARG]: what get_config raised`` from ml_collections' "flag --config=PATH:
  Error whilst parsing config file: Traceback ... ValueError: ..."; None for other flag errors."""
  _, found, traceback = message.partition(_TRACEBACK)
  if not found:
    return None
  lines = [line.strip() for line in traceback.splitlines() if line.strip()]
  last = lines[-1] if lines else "the config file raised an error"
  if last.startswith("ValueError: "):  # the config's own check: its message says it all
    last = last[len("ValueError: ") :]
  return f"config {spec}: {last}"


def _load_error(e: BaseException) -> str:
  if isinstance(e, OSError):
    # "Failed loading config file ...\n  Attempted [...]:\n ...\n  [Errno 2] No such file ...":
    # the last line names the file and the reason.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    last = last.split("earlier failure to load: ")[-1]
    return f"cannot load the config file: {last}"
  return f"{type(e).__name__}: {e}"


def _unknown_field(e: BaseException, argv: list[str], config_flag: str) -> str:
  """``unknown config field 'x' (--config.a.x): Did you mean "y" ...?``"""
  text = e
  while isinstance(text, BaseException):  # AttributeError(KeyError("'x'\nDid you mean ..."))
    text = text.args[0] if text.args else str(text)
  for _ in range(3):  # the field name may arrive as (a repr of) a repr
    if not (isinstance(text, str) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\""):
      break
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  name = lines[0].strip("'\"") if lines else "?"
  prefix = f"--{config_flag}."
  named = [
    a.split("=", 1)[0]
    for a in argv
    if a.startswith(prefix) and name in a.split("=", 1)[0].split(".")
  ]
  where = f" ({named[0]})" if named else ""
  hint = f": {' '.join(lines[1:])}" if len(lines) > 1 else ""
  return f"unknown config field {name!r}{where}{hint}"
