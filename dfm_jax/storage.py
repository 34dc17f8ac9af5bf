"""Paths that may be local or in a bucket (``gs://...``), and the checks a run makes on them
before any heavy work: placeholders refused by name, cloud credentials present.

Without credentials a first ``gs://`` access spends a minute or more in retries before it
fails with a traceback; `preflight` answers in about a second instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dfm_jax import config_schema

# The placeholder bucket the shipped configs name (configs/imagenet512.py and others).
_PLACEHOLDER = re.compile(r"^gs://BUCKET(/|$)")


class CloudAccessError(OSError):
  """A ``gs://`` path that cannot be reached from here (no credentials)."""


# Bad input rather than a failure: the command lines exit 2 on these, as on a bad flag.
USAGE_ERRORS = (config_schema.InvalidConfigError, CloudAccessError)


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (``gs://``, ``s3://``, ...), False for a local path."""
  return "://" in os.fspath(path)


def cloud_paths(config, **named: str) -> dict[str, str]:
  """{name: path} of every remote path in ``config`` (by dotted field name) and in ``named``
  (e.g. ``workdir=...``)."""
  out = {f"--{k}": v for k, v in named.items() if isinstance(v, str) and is_remote(v)}
  for name, value in config_schema.leaves(config).items():
    if isinstance(value, str) and is_remote(value):
      out[name] = value
  return out


def _emulated() -> bool:
  """A local GCS emulator (tests) or anonymous access needs no credentials."""
  return bool(os.environ.get("STORAGE_EMULATOR_HOST")) or os.environ.get("FSSPEC_GCS_TOKEN") in (
    "anon",
  )


def preflight(config, **named: str) -> None:
  """Checks every remote path of ``config`` and ``named`` (e.g. ``workdir=``) before any work:
  InvalidConfigError for a placeholder bucket, CloudAccessError when gs:// paths are named and
  no Google Cloud credentials can be found."""
  paths = cloud_paths(config, **named)
  placeholders = [
    f"{name} is the placeholder {path!r}: set it to a bucket of yours"
    for name, path in paths.items()
    if _PLACEHOLDER.match(path)
  ]
  if placeholders:
    raise config_schema.InvalidConfigError(placeholders)
  gcs = sorted(name for name, path in paths.items() if path.startswith("gs://"))
  if not gcs or _emulated():
    return
  import google.auth  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions  # pylint: disable=g-import-not-at-top

  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise CloudAccessError(
      f"{', '.join(gcs)} {'is' if len(gcs) == 1 else 'are'} on Google Cloud Storage, but no "
      "credentials were found: run `gcloud auth application-default login` (or set "
      "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file; on a Cloud TPU VM the "
      "VM's service account is used)"
    ) from e


def cache_dir() -> Path:
  """The user cache (weights, reference statistics, compiled programs): ``$DFM_JAX_CACHE``,
  else ``~/.cache/dfm_jax``."""
  return Path(os.environ.get("DFM_JAX_CACHE") or Path.home() / ".cache" / "dfm_jax").expanduser()


def enable_compilation_cache(config) -> None:
  """JAX's persistent compilation cache in ``cache_dir()/xla`` (``compilation_cache``, on by
  default): a restart, a resumed run or a second sample run loads the compiled train step and
  sampler instead of compiling them again. Entries are keyed by the program, the devices and
  the JAX version, so a stale one is never used."""
  if not config.get("compilation_cache", True):
    return
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
