"""A run's typed pieces: config -> validated experiment, mesh, abstract train state, shardings.

Training, sampling, evaluation and the compile check all start here, in this order: validate the
config -> build the mesh -> ``nnx.eval_shape`` the train state -> infer its shardings from the
logical axis rules. Nothing is allocated until ``init_state`` (or a checkpoint restore).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import ml_collections
from etils import epath
from flax import nnx

from dfm_jax import checkpoint, data as data_lib, decompose, experiment, sharding
from dfm_jax.train_state import create_train_state


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
    return checkpoint_dir(self.workdir)

  def ema_graphdef(self) -> nnx.GraphDef:
    return nnx.split(nnx.merge(self.graphdef, self.abstract_state).ema)[0]

  def checkpoint_facts(self) -> dict | None:
    """What every checkpoint of this run stores beyond its arrays and must agree with on restore
    (checkpoint.Checkpointer): the per-stage standardisation statistics, when
    ``decomposition.standardize`` is on (the checkpoints are where they are kept)."""
    stats = self.exp.decomposition.stats
    return {"stage_stats": stats.to_dict()} if stats is not None else None


def maybe_initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` with the config's address and process ids, if asked."""
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


def checkpoint_dir(workdir: str) -> str:
  return str(epath.Path(workdir) / "checkpoints")


# A published model (pretrained.Generator.publish) has no checkpoints: its statistics are here.
STAGE_STATS_FILE = "stage_stats.json"


def stats_batches(config):
  """The training batches ``[B, (T,) H, W, C]`` per-stage statistics are estimated from:
  ``decomposition.stats_batches`` of them, from a data stream of its own (seed + 1)."""
  it = data_lib.make_train_iterator(
    config.data, global_batch_size=config.batch_size, seed=config.seed + 1
  )
  return (next(it)["image"] for _ in range(int(config.decomposition.stats_batches)))


def stage_stats(config, exp, workdir, check_data: bool = True) -> decompose.StageStats | None:
  """Per-stage standardisation statistics (``decomposition.standardize``): those the run's
  newest checkpoint was saved with, else (a new run, when ``check_data``) estimated from data;
  the checkpoints then keep them. A published model's folder holds them in its own file."""
  if not config.decomposition.standardize:
    return None
  facts = checkpoint.saved_facts(checkpoint_dir(workdir)) if workdir else None
  if facts and "stage_stats" in facts:
    return decompose.StageStats.from_dict(facts["stage_stats"])
  published = epath.Path(workdir) / STAGE_STATS_FILE if workdir else None
  if published is not None and published.exists():
    return decompose.StageStats.from_dict(json.loads(published.read_text()))
  if not check_data:
    raise FileNotFoundError(
      f"decomposition.standardize is on but no checkpoint in {workdir} holds the per-stage "
      "statistics (they are estimated when training starts and saved with every checkpoint)"
    )
  return decompose.estimate_stats(exp.decomposition, stats_batches(config))


def setup(
  config: ml_collections.ConfigDict, workdir: str | None, devices=None, check_data: bool = True
) -> Run:
  """Validates the config and builds the mesh, the abstract state and its shardings.

  ``devices`` defaults to all devices of all processes. ``check_data=False`` (sampling,
  evaluation, compile checks) validates everything but the data block and reads no data.
  """
  devices = list(devices) if devices is not None else jax.devices()
  exp = experiment.from_config(
    config, len(devices), check_data=check_data, platform=devices[0].platform
  )
  stats = stage_stats(config, exp, workdir, check_data)
  exp = dataclasses.replace(exp, decomposition=exp.decomposition.with_stats(stats))
  mesh = sharding.make_mesh(
    experiment.mesh_shape(config, len(devices)), devices, config.mesh.dcn_shape
  )
  abstract = nnx.eval_shape(
    lambda: create_train_state(exp, config.optim, config.total_steps, config.seed)
  )
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.axis_rules)
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )
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
