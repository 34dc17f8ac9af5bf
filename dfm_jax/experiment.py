"""Turns a config into the typed pieces of a run, validating everything before heavy work starts."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np


from dfm_jax import data as data_lib
from dfm_jax import attention, config_schema, decompose, dit, flow, methods, sampler


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The typed pieces a run is made of (see :func:`from_config`)."""

  decomposition: decompose.Decomposition
  model: dit.DiTConfig
  flow: flow.FlowConfig  # the flow objective's settings (the config's flow block)
  sampler: sampler.SamplerConfig
  sample_shape: tuple[int, ...]  # one sample, without the batch axis: [(T,) H, W, C]
  null_label: int
  method_name: str = "dfm"
  method_options: Any = None  # the method's own settings (Method.options)

  @property
  def method(self) -> methods.Method:
    """The training objective and sampler chosen by ``config.method``."""
    return methods.METHODS.get(self.method_name)(self)


def _sample_shape(config, check_data: bool) -> tuple[int, ...]:
  """[H, W, C] of one sample, or [T, H, W, C] for videos (``data.frames`` = T > 0); for latents
  ``resolution`` / ``channels`` give the latent grid."""
  d = config.data
  shape = (int(d.resolution), int(d.resolution), int(d.channels))
  frames = int(d.frames)
  if frames < 0:
    raise ValueError(f"data.frames must be >= 0 (0 = images), got {frames}")
  try:
    video_source = getattr(data_lib.source_class(d), "video", False)
  except ValueError:
    video_source = None  # unknown source: reported by the data checks
  if video_source and not frames:
    raise ValueError(f"data.source {d.source!r} makes videos: set data.frames (frames per clip)")
  if video_source is False and frames and d.source != "latents":
    raise ValueError(
      f"data.frames={frames} but data.source {d.source!r} holds images; use "
      "data.frames=0 or a video source (moving_digits, video_folder)"
    )
  if frames:
    shape = (frames,) + shape
  if d.source == "latents" and check_data:
    from dfm_jax.data import latent_shards  # pylint: disable=g-import-not-at-top

    if not latent_shards.is_shard_set(d.path):  # shard sets: checked with the data block
      found = latent_shards.latent_shape(d.path)
      where = f"data.path: latents in {d.path!r}"
      latent_shards.check_latent_shape(where, found, d.resolution, d.channels, frames)
  return shape


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) mesh shape with a single -1 filled from the device count."""
  shape = [int(v) for v in config.mesh.shape]
  if len(shape) != 3:
    raise ValueError(f"mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1 or any(v == 0 or v < -1 for v in shape):
    raise ValueError(f"mesh.shape entries must be positive with at most one -1, got {shape}")
  known = int(np.prod([v for v in shape if v != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide the {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
      f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, {num_devices} are available"
    )
  return tuple(shape)


def from_config(
  config: ml_collections.ConfigDict,
  num_devices: int = 1,
  check_data: bool = True,
  platform: str | None = None,
) -> Experiment:
  """Validates ``config`` and builds the typed pieces; raises one ValueError naming every problem.

  ``num_devices`` is the global device count (for the batch and mesh checks). ``check_data``
  also validates the data block (paths exist, sizes fit). ``platform`` (the devices' platform,
  e.g. 'cpu', 'gpu', 'tpu'; None: unknown) also checks that ``model.attention`` can run there.
  """
  config_schema.check(config)  # types and ranges first: the checks below assume them
  problems: list[str] = []

  def attempt(fn):
    try:
      return fn()
    except KeyError as e:  # str() of a KeyError is the repr of its message
      problems.append(str(e.args[0]) if e.args else repr(e))
      return None
    except (ValueError, FileNotFoundError) as e:
      problems.append(str(e))
      return None

  data_ok = not check_data or attempt(lambda: data_lib.validate_data_config(config.data) or True)
  method_name = config.method
  method_cls = attempt(lambda: methods.METHODS.get(method_name))
  if method_cls is not None:
    problems.extend(method_cls.check_config(config))
  mesh = attempt(lambda: mesh_shape(config, num_devices))
  accum = config.optim.grad_accum_steps
  if mesh is not None and config.batch_size % (accum * mesh[0] * mesh[1]):
    micro = f"{accum} microbatches (optim.grad_accum_steps) x " if accum > 1 else ""
    problems.append(
      f"batch_size {config.batch_size} is not divisible by {micro}the "
      f"{mesh[0] * mesh[1]} data-parallel devices (mesh data x fsdp = "
      f"{mesh[0]} x {mesh[1]})"
    )
  attention_impl = config.model.attention
  if platform is not None and attention_impl in attention.ATTENTIONS:
    attempt(lambda: attention.check_attention_platform(attention_impl, platform))
  dec_cfg = config.decomposition
  upsample = tuple(config.model.stage_upsample or ())
  decomposition = attempt(
    lambda: decompose.build(
      dec_cfg.kind,
      dec_cfg.num_stages,
      halve_time=dec_cfg.halve_time,
      level_gaps=tuple(dec_cfg.level_gaps) or None,
      stage_upsample=upsample or None,
    )
  )
  stages = int(dec_cfg.num_stages)
  if len(config.flow.stage_probs) != stages:
    problems.append(
      f"flow.stage_probs has {len(config.flow.stage_probs)} entries for {stages} stages"
    )
  flow_cfg = attempt(lambda: flow.FlowConfig.from_config(config))
  if len(config.sampler.steps_per_stage) != stages:
    problems.append(
      f"sampler.steps_per_stage has {len(config.sampler.steps_per_stage)} "
      f"entries for {stages} stages"
    )
  sampler_cfg = attempt(
    lambda: sampler.SamplerConfig(
      tuple(config.sampler.steps_per_stage),
      tuple(config.sampler.thresholds),
      solver=config.sampler.solver,
      cfg_scale=config.sampler.cfg_scale,
      guidance_interval=config.sampler.guidance_interval,
      heun_final_euler=config.sampler.heun_final_euler,
      auto_schedule=bool(config.sampler.auto_schedule),
    )
  )
  if config.sampler.auto_schedule and config.method != "dfm":
    problems.append(
      f"sampler.auto_schedule chooses DFM's stage schedule; method {config.method!r} has its "
      "own: set sampler.auto_schedule=False"
    )

  # the stored latents' shape is read only from a data block that passed its checks
  shape = attempt(lambda: _sample_shape(config, check_data and bool(data_ok)))
  model_cfg = None
  if decomposition is not None and shape is not None:
    full = (1,) + tuple(shape)
    ok = attempt(lambda: decomposition.check_shape(full, min_stage_size=config.model.patch_size))
    if ok is None and not problems:
      stage_shapes = tuple(s[1:] for s in decomposition.stage_shapes(full))
      model_kw = dict(
        stage_shapes=stage_shapes,
        # the model patchifies the (possibly upsampled) coarsest stage: the token grid is that
        # of model.patch_size on the stage at its own size
        patch_size=config.model.patch_size * decomposition.upsample[0],
        mlp_ratio=config.model.mlp_ratio,
        num_classes=config.data.num_classes,
        pos_embed=config.model.pos_embed,
        stage_index_embed=config.model.stage_index_embed,
        dtype=config.model.dtype,
        residual_dtype=config.model.residual_dtype,
        remat=bool(config.model.remat),
        remat_policy=config.model.remat_policy,
        attention=attention_impl,
        activation_rules=tuple(config.mesh.axis_rules),
        scan_unroll=config.model.scan_unroll,
        precondition=bool(config.model.precondition),
        loss_weighting=config.model.loss_weighting,
        **method_cls.model_options(config),
      )
      if config.model.size == "custom":
        model_cfg = attempt(
          lambda: dit.DiTConfig(
            hidden_size=config.model.hidden_size,
            depth=config.model.depth,
            num_heads=config.model.num_heads,
            **model_kw,
          )
        )
      else:
        model_cfg = attempt(lambda: dit.DiTConfig.from_size(config.model.size, **model_kw))
  if problems:
    raise config_schema.InvalidConfigError(problems)
  return Experiment(
    decomposition=decomposition,
    model=model_cfg,
    flow=flow_cfg,
    sampler=sampler_cfg,
    sample_shape=tuple(shape),
    null_label=int(config.data.num_classes),
    method_name=method_name,
    method_options=method_cls.options(config),
  )
