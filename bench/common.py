"""Shared benchmark helpers: repository import path, interleaved timing, tables, train steps.

Every comparison in these scripts is timed side by side: the variants run in alternating order
within each round, and ratios are taken per round and then summarised by their median, so load
from other processes on a shared machine affects both sides of a ratio alike.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402  (after the path fix above)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dfm_jax.provenance import machine_summary, provenance  # noqa: E402,F401  (re-exported)


# ---------------------------------------------------------------------------------------------
# Machine and output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with right-aligned columns (also valid Markdown)."""
  cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
  return "\n".join(lines)


def _cell(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


class Report:
  """What a benchmark prints, kept for its results file.

  ``say`` prints a line of context (machine, setup), ``table`` a table, and ``finish`` the
  headline (always the last line) and then, given ``out``, writes all of it with the run's
  provenance to that JSON file. docs/benchmarks.md quotes those tables and headlines verbatim,
  and tests/test_published_numbers.py checks that it still does.
  """

  def __init__(self, out: str = ""):
    self.out = out
    if out:  # an unwritable --out fails now, not after the measurements
      from etils import epath  # pylint: disable=g-import-not-at-top

      from dfm_jax import storage  # pylint: disable=g-import-not-at-top

      try:
        storage.check_writable(epath.Path(out).parent, "--out results")
      except OSError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: {e}") from None
    self.lines: list[str] = []
    self.tables: list[dict[str, Any]] = []
    self.records: dict[str, Any] = {}  # raw figures kept beside the tables

  def say(self, line: str) -> None:
    print(line, flush=True)
    self.lines.append(line)

  def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    rows = [[_cell(v) for v in row] for row in rows]
    print(f"\n{title}\n{format_table(headers, rows)}", flush=True)
    self.tables.append({"title": title, "headers": [str(h) for h in headers], "rows": rows})

  def finish(self, headline: str) -> None:
    print(headline, flush=True)
    if self.out:
      from dfm_jax import storage  # pylint: disable=g-import-not-at-top

      record = {"provenance": provenance(sys.argv), "lines": self.lines, "tables": self.tables}
      storage.write_json(self.out, dict(record, headline=headline, **self.records))


def add_out_flag(parser) -> None:
  """``--out``: where ``Report.finish`` writes the results file (docs/bench_<script>.json)."""
  parser.add_argument(
    "--out", default="", help="write the tables and headline, with provenance, to this JSON file"
  )


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved_times(
  fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
  """Seconds per call of each blocking ``fn()``, measured in alternating rounds.

  Every function first runs ``warmup`` times untimed. Then each of ``rounds`` rounds calls every
  function once, rotating the order from round to round so none always runs first.
  """
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      fns[name]()
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
  return times


def median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
  """Median, 25th and 75th percentile of the per-round ratios ``num[r] / den[r]``."""
  ratios = np.asarray(num, np.float64) / np.asarray(den, np.float64)
  q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
  return float(q50), float(q25), float(q75)


def blocking(fn: Callable[[], Any]) -> Callable[[], Any]:
  """Wraps ``fn`` so it returns only when its JAX results are computed."""
  return lambda: jax.block_until_ready(fn())


# ---------------------------------------------------------------------------------------------
# Compiled-program figures


def xla_flops(stage) -> float:
  """FLOPs of one call from XLA's cost analysis of a lowered or compiled program. XLA counts a
  loop body once, whatever its trip count: see :func:`step_flops` for the train step."""
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def step_flops(
  config: ml_collections.ConfigDict, depth: int, local_batch_shape: dict, devices=None
) -> float:
  """XLA's FLOP count of one train step with all ``depth`` DiT blocks unrolled (the scanned
  step's count would hold one block), from the lowered program: nothing is compiled."""
  from dfm_jax import train  # pylint: disable=g-import-not-at-top

  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.scan_unroll = depth
  with tempfile.TemporaryDirectory() as workdir:
    run = train.setup(config, workdir, devices)
  return xla_flops(train.lower_step(run, local_batch_shape))


_COPY = re.compile(r"= (pred|[a-z]+\d+)\[([\d,]*)\](?:\{[^}]*\})? copy\(")


def copied_bytes(compiled) -> int:
  """Bytes of the ``copy`` instructions in a compiled program's optimised HLO (each one
  materialises a buffer; a train step that copies its whole state shows about the state size)."""
  total = 0
  for dtype, dims in _COPY.findall(compiled.as_text()):
    size = 1 if dtype == "pred" else max(int(re.match(r"[a-z]+(\d+)", dtype).group(1)) // 8, 1)
    total += size * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def leaf_bytes(tree) -> int:
  """Total bytes of the (abstract) array leaves of ``tree``."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of array or ``ShapeDtypeStruct`` leaves carrying shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------------
# Configurations and train steps


def load_config(name: str, arg: str = "dfm") -> ml_collections.ConfigDict:
  """``get_config(arg)`` of ``configs/<name>.py``, or of a ``.py`` path relative to the
  repository (as ``--config=<path>:<arg>``)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = REPO / name if name.endswith(".py") else REPO / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def latent_config(
  base: ml_collections.ConfigDict,
  workdir: str,
  resolution: int,
  channels: int,
  num: int = 8,
  frames: int = 0,
) -> ml_collections.ConfigDict:
  """``base`` reading ``num`` random latents ``[resolution, resolution, channels]`` (video
  latents ``[frames, resolution, resolution, channels]`` when ``frames`` > 0) that are written to
  ``workdir`` (the configs validate their data even when the benchmark feeds its own batches)."""
  clip = (frames,) if frames else ()
  path = os.path.join(workdir, f"latents_{frames}x{resolution}x{channels}.npz")
  if not os.path.exists(path):
    rng = np.random.default_rng(0)
    np.savez(
      path,
      latents=rng.standard_normal((num, *clip, resolution, resolution, channels), np.float32),
      labels=rng.integers(0, 10, num).astype(np.int32),
    )
  c = ml_collections.ConfigDict(base.to_dict())
  c.data.source = "latents"
  c.data.path = path
  c.data.resolution = resolution
  c.data.channels = channels
  c.data.num_classes = 10
  if frames:
    c.data.frames = frames
  return c


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch of standard-normal images (or clips, when ``data.frames`` is set) and random
  labels for ``config``."""
  d = config.data
  rng = np.random.default_rng(seed)
  clip = (d.frames,) if d.get("frames") else ()
  shape = (config.batch_size, *clip, d.resolution, d.resolution, d.channels)
  return {
    "image": rng.standard_normal(shape, np.float32),
    "label": rng.integers(0, d.num_classes, config.batch_size).astype(np.int32),
  }


@dataclasses.dataclass
class TrainStep:
  """A compiled train step with its own state; calling it runs one blocking step."""

  run: Any
  compiled: Any
  state: Any
  batch: dict
  flops: float  # XLA's count for one step, every block counted (see step_flops)

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return metrics

  @property
  def num_params(self) -> int:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from dfm_jax import dit  # pylint: disable=g-import-not-at-top

    return dit.count_parameters(nnx.merge(self.run.graphdef, self.run.abstract_state).model)


def build_train_steps(
  configs: dict[str, ml_collections.ConfigDict],
  devices=None,
  initialize: bool = True,
  batches: dict[str, dict] | None = None,
  count_flops: bool = True,
) -> dict[str, TrainStep]:
  """Sets up each config and compiles its train step through ``dfm_jax.train``'s own path.

  ``devices``: a device list for all configs, or a dict of lists by config name (default: all
  devices). The variants compile concurrently on two threads (XLA compiles mostly on one core).
  Batches
  default to :func:`random_batch`. With ``initialize=False`` no state is created (for
  compile-only figures) and the steps cannot be called. With ``count_flops=False`` the
  unrolled step is not lowered for :func:`step_flops` (``flops`` is nan).
  """
  from dfm_jax import sharding, train  # pylint: disable=g-import-not-at-top

  def build(name):
    config = configs[name]
    batch = (batches or {}).get(name) or random_batch(config)
    own_devices = devices.get(name) if isinstance(devices, dict) else devices
    with tempfile.TemporaryDirectory() as workdir:
      run = train.setup(config, workdir, own_devices)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    compiled = train.compile_step(run, shapes)
    flops = (
      step_flops(config, run.exp.model.depth, shapes, own_devices) if count_flops else math.nan
    )
    state = jax.block_until_ready(train.init_state(run)) if initialize else None
    return TrainStep(run, compiled, state, sharding.global_batch(batch, run.mesh), flops)

  with ThreadPoolExecutor(max_workers=2) as pool:
    return dict(zip(configs, pool.map(build, configs)))
