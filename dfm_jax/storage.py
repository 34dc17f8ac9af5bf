"""Paths that may be local or in a bucket (``gs://...``), and the checks a run makes on them
before any heavy work: placeholders refused by name, cloud credentials present. Also the one
way to write a file whole or not at all (`atomic_path`, `write_text`, `write_json`), the one
tree copy between any two such paths, and weights fetched from where users keep them
(`local_copy`: a local path, ``gs://``, or the Hugging Face Hub at a pinned revision).

Without credentials a first ``gs://`` access spends a minute or more in retries before it
fails with a traceback; `preflight` answers in about a second instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from dfm_jax import config_schema
from dfm_jax.errors import CloudAccessError

# The placeholder bucket the shipped configs name (configs/imagenet512.py and others).
_PLACEHOLDER = re.compile(r"^gs://BUCKET(/|$)")


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
  if not config.compilation_cache:
    return
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Any]:
  """A temporary name beside ``path`` (local or ``gs://``; an ``etils.epath.Path`` with the
  same suffix) for the block to write; renamed onto ``path`` when the block succeeds and removed
  when it fails, so a reader (or a crash) finds the file whole or as it was before."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp{path.suffix}"
  try:
    yield tmp
    tmp.replace(path)  # os.replace locally: atomic, replacing an older file
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise


def check_writable(folder, what: str) -> None:
  """Creates ``folder`` (local or ``gs://``) and writes and deletes a probe file in it, so a run
  that will write ``what`` there fails before its work, not after it.

  Raises:
    OSError: one line naming ``what``, the folder and the reason.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top

  folder = epath.Path(folder)
  probe = folder / f".write_check.{socket.gethostname()}.{os.getpid()}"  # hosts may share it
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    reason = (
      "a file is in the way"
      if isinstance(e, (FileExistsError, NotADirectoryError))
      else e.strerror or str(e)
    )
    raise OSError(f"cannot write {what} to {folder}: {reason}") from e


def write_text(path, text: str) -> None:
  """Writes ``text`` to ``path`` (local or ``gs://``) whole or not at all."""
  with atomic_path(path) as tmp:
    tmp.write_text(text)


def write_json(path, obj: Any) -> None:
  """Writes ``obj`` as indented, key-sorted JSON to ``path`` whole or not at all."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def copy_tree(source, target) -> None:
  """Copies a file or a folder (recursively) between local or ``gs://`` paths (etils.epath),
  overwriting files of the same name."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  source, target = epath.Path(source), epath.Path(target)
  if not source.is_dir():
    target.parent.mkdir(parents=True, exist_ok=True)
    source.copy(target, overwrite=True)
    return
  target.mkdir(parents=True, exist_ok=True)
  for p in source.iterdir():
    copy_tree(p, target / p.name)


HUB = "hf://"  # hf://OWNER/REPO@REVISION[/PATH]: a file (or, without PATH, the repository)


def local_copy(spec: str, field: str) -> str:
  """A local path holding the weights that config field ``field`` names as ``spec``.

  - a local path (or ''): returned as it is (the caller checks it);
  - ``gs://...`` (any etils.epath URL): copied once into ``cache_dir()/weights/`` and reused;
  - ``hf://OWNER/REPO@REVISION/PATH``: the file PATH of that Hugging Face Hub repository at
    that revision (a commit hash or tag: pinned, so a run is reproducible), downloaded once
    into ``cache_dir()/hub`` (huggingface_hub; ``HF_HUB_OFFLINE=1`` uses the cache only);
    without ``/PATH``, the whole repository (a folder).

  Raises FileNotFoundError or ValueError naming ``field`` when it cannot be fetched.
  """
  if not spec or not is_remote(spec):
    return spec
  if spec.startswith(HUB):
    return _from_hub(spec, field)
  from etils import epath  # pylint: disable=g-import-not-at-top

  source = epath.Path(spec)
  target = cache_dir() / "weights" / hashlib.sha256(spec.encode()).hexdigest()[:16] / source.name
  if target.exists():
    return str(target)
  if not source.exists():
    raise FileNotFoundError(f"{field}: {spec} does not exist")
  partial = target.parent / f".{target.name}.partial-{os.getpid()}"
  try:
    copy_tree(source, partial)
    os.replace(partial, target)  # whole or absent: an interrupted copy is never reused
  finally:
    if partial.is_dir():
      shutil.rmtree(partial, ignore_errors=True)
    elif partial.exists():
      partial.unlink()
  return str(target)


def _from_hub(spec: str, field: str) -> str:
  repo, _, path = spec[len(HUB) :].partition("/")  # OWNER
  name, _, rest = path.partition("/")  # REPO@REVISION, PATH
  repo_id, _, revision = f"{repo}/{name}".partition("@")
  if not revision or repo_id.count("/") != 1 or not all(repo_id.split("/")):
    raise ValueError(
      f"{field}: {spec!r} is not hf://OWNER/REPO@REVISION[/PATH]; pin a revision (a commit "
      "hash or tag) so that the run can be reproduced"
    )
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"{field}: {spec} needs huggingface_hub (pip install huggingface_hub)") from e
  hub_cache = str(cache_dir() / "hub")
  try:
    if rest:
      return huggingface_hub.hf_hub_download(repo_id, rest, revision=revision, cache_dir=hub_cache)
    return huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=hub_cache)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(
      f"{field}: cannot fetch {spec} from the Hugging Face Hub: {reason}"
    ) from e
