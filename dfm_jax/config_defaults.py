"""Every configuration field with its default; the files in ``configs/`` override these.

Config files take comma-separated variants after a colon (``configs/default.py:fm,runlocal``):

- ``fm``: the flow-matching twin (:func:`flow_matching_twin`) keeps the backbone, the token count
  and the total sampling steps and drops to one stage: plain flow matching at equal compute.
- ``pyramidal``: the Pyramidal Flow twin (:func:`pyramidal_twin`), offered by every config that
  offers ``fm``, with the same backbone, token count and total sampling steps.
- ``cascade``: the cascade twin (:func:`cascade_twin`): the paper's cascade baseline with the
  same backbone, token count and total sampling steps.
- ``runlocal``: tiny sizes and a few steps (:func:`runlocal`) for smoke runs, tests and the
  notebook on a CPU.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from dfm_jax import data as data_lib
from dfm_jax import storage


def per_stage_field(value) -> ml_collections.FieldReference:
  """A config field that takes one value for every stage or a tuple with one value per stage
  (ml_collections otherwise refuses to replace a float by a tuple)."""
  return ml_collections.FieldReference(value, field_type=object)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "dfm"  # a name in dfm_jax.methods.METHODS: dfm | fm | pyramidal_flow | cascade
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64  # global, over all devices and processes
  c.log_every = 50
  c.checkpoint_every = 500
  c.sample_every = 500
  c.keep_checkpoints = 3
  c.num_grid_samples = 40  # images in each periodic sample grid
  c.stop_on_nonfinite = True
  # Multi-process runs: every this many steps the processes compare their stop signals (SIGTERM,
  # Ctrl-C), so that all of them save the same step however the signal reached them; each
  # comparison waits for the devices once. Single-process runs check after every step.
  c.preemption_check_every = 10
  # JAX's persistent compilation cache in $DFM_JAX_CACHE/xla (default ~/.cache/dfm_jax/xla): a
  # restart or a second sample run does not compile again (dfm_jax/storage.py).
  c.compilation_cache = True
  c.profile_steps = ()  # (first, last): write a profiler trace of these steps to workdir/profile
  # A workdir (its newest intact checkpoint) or one checkpoint step directory
  # (WORKDIR/checkpoints/STEP) whose EMA weights initialise a fresh run: plain fine-tuning, or a
  # single-stage model fine-tuned into DFM (dfm_jax.init_from). Ignored once the run's own
  # workdir has a checkpoint (a restart resumes from that). '' = random initialisation.
  c.init_from = ""

  c.data = data_lib.default_data_config()

  c.decomposition = ml_collections.ConfigDict()
  c.decomposition.kind = "laplacian"  # laplacian | dct | dwt
  c.decomposition.num_stages = 2
  c.decomposition.halve_time = False  # videos: also halve the time axis
  c.decomposition.level_gaps = ()  # halvings between consecutive stages; () = one each
  c.decomposition.standardize = False  # per-stage unit std, estimated from data
  c.decomposition.stats_batches = 20  # batches used to estimate the statistics

  c.model = ml_collections.ConfigDict()
  c.model.size = "custom"  # S | B | L | XL set width, depth and heads; custom uses the fields
  c.model.hidden_size = 384
  c.model.depth = 12
  c.model.num_heads = 6
  c.model.mlp_ratio = 4.0
  c.model.patch_size = 2  # patch of the coarsest stage; finer stages scale up
  # Per-stage nearest-upsampling factor, () = all 1: stage s is noised, predicted and sampled
  # at k times its size and averaged back down to recompose. (2, 1) lets the coarse stage keep
  # a pretrained single-stage model's patch size when fine-tuning into DFM (paper section 4.5);
  # model.patch_size stays the patch of the coarsest stage at its own size (the model patchifies
  # the upsampled stage with k x patch_size), so the token count does not change.
  c.model.stage_upsample = ()
  c.model.pos_embed = "rope"  # rope | sincos
  c.model.stage_index_embed = True
  c.model.dtype = "float32"  # float32 | bfloat16 (compute; parameters stay float32)
  # float32 | bfloat16: the residual stream between blocks (bfloat16 halves the memory traffic
  # of the norms, modulation and gated adds around each block; see docs/benchmarks.md section 6)
  c.model.residual_dtype = "float32"
  # Rematerialisation of each block: none | full (recompute the block in the backward pass) |
  # dots_saveable | dots_with_no_batch_dims_saveable | save_attention_out (keep only those).
  c.model.remat_policy = "none"
  c.model.remat = False  # deprecated alias: True with remat_policy 'none' means 'full'
  # auto | xla | cudnn (GPU, bfloat16, head_dim % 8 == 0 and <= 128) | splash (TPU Pallas
  # kernel, token count and head_dim multiples of 128). auto: the platform's fused kernel where
  # it applies, else XLA (always XLA on CPUs).
  c.model.attention = "auto"
  # Blocks per scan iteration; 0 = auto: every block unrolled on GPUs (DiT-XL/2 on an H100:
  # 1.37x the steps/s and half the activation memory of the scan), 1 (a scan, compile time
  # independent of depth) on CPUs and TPUs. depth: fully unrolled anywhere.
  c.model.scan_unroll = 0
  # Per-stage EDM-style input/output scaling (paper appendix A.1) from per-stage data mean and
  # std, estimated at the start of training from decomposition.stats_batches batches and saved
  # with the checkpoint; the loss becomes the unit-variance regression of the network.
  c.model.precondition = True
  # The loss under preconditioning: "edm" (each stage's velocity error weighted by
  # 1 / c_out(t)^2, the unit-variance regression of the network) or "velocity" (unweighted,
  # the paper's velocity MSE). On Fashion-MNIST at 4,000 steps "velocity" gave DFM 67.0 (one
  # seed, 68.0 with "edm") and flow matching 64.8 (two seeds, 68.4); docs/benchmarks.md sec. 11.
  c.model.loss_weighting = "edm"

  c.flow = ml_collections.ConfigDict()
  c.flow.stage_probs = (0.9, 0.1)  # p_q
  # A p_q schedule: p_q moves linearly from stage_probs at step 0 to these at total_steps.
  c.flow.final_stage_probs = ml_collections.config_dict.placeholder(tuple)  # None: constant
  c.flow.main_loc = 0.0
  c.flow.main_scale = 1.0
  c.flow.early_loc = 1.5  # the re-implementation: 2.0
  c.flow.early_scale = 1.0
  c.flow.per_sample_stage = True  # False: one main stage per batch
  c.flow.stage_weights = ml_collections.config_dict.placeholder(tuple)  # None: all 1
  c.flow.label_dropout = 0.1

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 10_000
  c.optim.schedule = "constant"  # constant | cosine (after warm-up)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  # Microbatches per step: the global batch is split into this many (scanned one after the
  # other), their gradients and metrics averaged, and one update applied. batch_size must be
  # divisible by grad_accum_steps x the data-parallel devices (mesh data x fsdp).
  c.optim.grad_accum_steps = 1

  c.sampler = ml_collections.ConfigDict()
  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)
  c.sampler.solver = "euler"  # euler | heun
  # One scale for every stage, or one per stage, e.g. (2.0, 1.0): guide the coarse stage only.
  c.sampler.cfg_scale = per_stage_field(1.0)
  # One (lo, hi) pair in each stage's own t, or one pair per stage.
  c.sampler.guidance_interval = per_stage_field((0.0, 1.0))
  c.sampler.heun_final_euler = False  # heun: True makes the last step (to t = 1) Euler (EDM)
  # True: keep sum(steps_per_stage) but choose its split and the thresholds from the model's
  # per-stage data std (dfm_jax/stage_schedule.py; method dfm only). Off: on Fashion-MNIST it
  # took steps from the coarse stage and lost (FID 80.0 vs 67.0; docs/benchmarks.md section 11).
  c.sampler.auto_schedule = False
  c.sampler.num_samples = 64  # --mode=sample
  c.sampler.batch_size = 64
  c.sampler.checkpoint_step = -1  # -1: latest

  # method 'cascade' (dfm_jax/methods/cascade.py; t = 1 is clean, noise level = 1 - t):
  c.cascade = ml_collections.ConfigDict()
  c.cascade.low_res_fraction = 0.8  # share of total_steps training the low-resolution model
  c.cascade.cond_loc = 1.5  # training: conditioning t_c ~ logit-normal(cond_loc, cond_scale)
  c.cascade.cond_scale = 1.0
  c.cascade.sample_noise = 0.025  # sampling: conditioning noise level 1 - t_c

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 1000
  c.eval.batch_size = 100
  c.eval.num_real = 5000  # real images for the reference statistics
  c.eval.real_split = "train"
  c.eval.classifier = ""  # name of a digit/clothes classifier for 28x28 data ('' = none)
  # Names in dfm_jax.evaluation.scores.METRICS; fdd runs when fdd_weights is set, classifier
  # when eval.classifier is.
  c.eval.metrics = ("fid", "kid", "is", "fdd", "classifier")
  c.eval.fdd_weights = ""  # official DINOv2 checkpoint (.pth), e.g. dinov2_vitl14_pretrain.pth
  c.eval.inception_batch = 50  # images per Inception call
  # Videos: frames per clip scored by the frame FID (0: all); the Kinetics-400 I3D state dict
  # (i3d_pretrained_400.pt) that enables 'fvd', and clips per I3D call.
  c.eval.frame_fid_frames = 0
  c.eval.i3d_weights = ""
  c.eval.i3d_batch = 8
  # Reference pictures; source '' means the training data (a latent run needs a pixel source).
  c.eval.reference = data_lib.default_data_config()
  c.eval.reference.source = ""
  c.eval.every = 0  # > 0: a small evaluation every this many training steps
  c.eval.train_num_samples = 200  # samples of that small evaluation
  # --mode=eval: also write the samples to workdir/eval/<tag>.samples.npz (with
  # eval.metrics=() that is all it does: sample on an accelerator, score elsewhere) ...
  c.eval.save_samples = False
  # ... and score such a file instead of sampling (no checkpoint needed).
  c.eval.samples_from = ""

  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.kind = ""  # a name in dfm_jax.autoencoders.AUTOENCODERS ('' = pixel space)
  c.autoencoder.weights = ""  # weight file(s) of the autoencoder
  c.autoencoder.scale = ml_collections.config_dict.placeholder(float)  # None: the preset's
  c.autoencoder.shift = ml_collections.config_dict.placeholder(float)
  c.autoencoder.batch_size = 32  # images per encode/decode call

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one axis may be -1
  # Multislice: slices (TPU; processes on GPU/CPU) each axis spans over the data-centre network,
  # e.g. (2, 1, 1) for data parallelism across 2 slices; each entry divides mesh.shape's.
  c.mesh.dcn_shape = (1, 1, 1)
  # Logical axes -> mesh axes. FSDP shards 'embed' over 'fsdp'; tensor parallelism shards
  # 'mlp' and 'heads' over 'tensor'. The activation names: the token activations [B, N, D] in
  # the blocks are constrained to (batch, tokens, embed_act), batch split over data x fsdp and
  # the rest replicated (under a mesh; a batch they do not divide is left unconstrained).
  c.mesh.axis_rules = (
    ("batch", ("data", "fsdp")),
    ("tokens", None),
    ("embed_act", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("patch", None),
    ("layers", None),
  )

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # call jax.distributed.initialize() (TPU pods, clusters)
  c.distributed.coordinator_address = ""  # empty: auto-detect (Cloud TPU, SLURM)
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def paper_imagenet_config() -> ml_collections.ConfigDict:
  """The paper's ImageNet training setup (arXiv 2506.19839, its training details) on latents."""
  c = base_config()
  c.batch_size = 256
  c.log_every = 100
  c.checkpoint_every = 5000
  c.sample_every = 10_000
  c.data.source = "latents"
  c.data.num_classes = 1000
  c.data.num_workers = 8
  c.data.channels = 16  # latent channels of the 16-channel autoencoder
  c.model.size = "XL"
  c.model.pos_embed = "rope"
  c.model.stage_index_embed = True
  c.model.dtype = "bfloat16"
  # full fits every slice checked (docs/compile_check.md) at 1.33x the FLOPs of no remat;
  # where HBM allows (v5p-64: 22.8 GiB per chip), dots_saveable is the faster choice.
  c.model.remat_policy = "full"
  c.flow.stage_probs = (0.9, 0.1)
  c.flow.main_loc = 0.0
  c.flow.early_loc = 1.5
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 10_000
  c.optim.b1, c.optim.b2 = 0.9, 0.99
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.sampler.cfg_scale = 1.0
  # A power of two: a sampling batch that does not divide over the slice's chips is not split
  # (every chip would sample all of it); 256 divides every slice up to 256 chips.
  c.eval.batch_size = 256
  # The FLUX.1 autoencoder (16 channels, 8x down; scale 0.3611, shift 0.1159): its
  # ae.safetensors (FLUX or diffusers key layout) is supplied by the user.
  c.autoencoder.kind = "flux1"
  c.autoencoder.weights = "/data/flux1/ae.safetensors"
  c.autoencoder.batch_size = 16
  # The pixels `python -m dfm_jax.encode` encodes and `--mode=eval` compares against: the
  # ImageNet training split from TFDS (ArrayRecord build), ADM-style centre crops.
  imagenet = data_lib.default_data_config()
  imagenet.source = "tfds"
  imagenet.tfds_name = "imagenet2012"
  imagenet.channels = 3
  imagenet.crop = "center"
  imagenet.num_classes = 1000
  imagenet.num_workers = 8
  c.encode = ml_collections.ConfigDict({"data": imagenet})
  c.eval.reference = ml_collections.ConfigDict(imagenet.to_dict())
  c.eval.num_real = 50_000
  return c


def _twin(c, method: str, per_stage) -> tuple[ml_collections.ConfigDict, int, int, int]:
  """A copy of DFM config ``c`` for another method: ``per_stage(value, name)`` maps its
  per-stage guidance settings, the p_q schedule and stage weights (DFM's own) are dropped.
  Returns ``(copy, S, L, steps)``: the DFM's stage count, pyramid levels between its coarsest
  stage and the full sample, and total sampling steps."""
  c = ml_collections.ConfigDict(c.to_dict())
  for name in ("cfg_scale", "guidance_interval"):  # to_dict() drops the field type
    c.sampler[name] = per_stage_field(per_stage(c.sampler[name], name))
  stages = c.decomposition.num_stages
  levels = sum(c.decomposition.level_gaps) if c.decomposition.level_gaps else stages - 1
  c.method = method
  c.flow.stage_weights = None
  c.flow.final_stage_probs = None
  return c, stages, levels, sum(c.sampler.steps_per_stage)


def flow_matching_twin(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The single-stage twin of a DFM config with the same backbone and token count."""
  c, _, levels, steps = _twin(c, "fm", _one_stage)
  c.model.patch_size = c.model.patch_size * 2**levels
  c.decomposition.num_stages = 1
  c.decomposition.level_gaps = ()
  c.model.stage_upsample = ()
  c.flow.stage_probs = (1.0,)
  c.sampler.steps_per_stage = (steps,)
  c.sampler.thresholds = ()
  return c


def cascade_twin(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The cascade twin of a DFM config: the DFM config's coarsest stage is the low resolution
  (same patch, so the same tokens per model), the full sample the high one (one level gap
  spanning the pyramid), the same backbone, and the total sampling steps split evenly."""
  c, _, levels, total = _twin(c, "cascade", _stage_ends)
  c.decomposition.num_stages = 2
  c.decomposition.level_gaps = (levels,)
  c.decomposition.standardize = False  # whole images; model.precondition scales them
  c.flow.stage_probs = (1.0, 0.0)  # unused by the cascade
  c.sampler.steps_per_stage = (total // 2, total - total // 2)  # the paper: 20 + 20
  c.sampler.thresholds = c.sampler.thresholds[:1] or (0.5,)  # unused by the cascade
  return c


def _stage_ends(value, name: str):
  """A per-stage sampler setting for the cascade's two models: the coarsest and finest stage's
  values (a value shared by every stage stays as it is)."""
  per_stage = (
    isinstance(value, (tuple, list))
    and len(value)
    and (isinstance(value[0], (tuple, list)) if name == "guidance_interval" else True)
  )
  if not per_stage:
    return tuple(value) if isinstance(value, list) else value
  return (value[0], value[-1])


def _one_stage(value, name: str):
  """The single-stage form of a per-stage sampler setting: a value shared by every stage, or
  a per-stage tuple whose entries are all equal; other per-stage values have no FM twin."""
  per_stage = (
    isinstance(value, (tuple, list))
    and len(value)
    and (isinstance(value[0], (tuple, list)) if name == "guidance_interval" else True)
  )
  if not per_stage:
    return value
  if any(tuple(np.ravel(v)) != tuple(np.ravel(value[0])) for v in value):
    raise ValueError(
      f"sampler.{name} = {tuple(value)} differs between stages; the flow "
      f"matching twin has one stage: set sampler.{name} for it explicitly"
    )
  return tuple(value[0]) if name == "guidance_interval" else value[0]


# Twins every config that offers ``fm`` also offers (applied by :func:`apply_variants`).
FM_SIBLINGS = ("pyramidal", "cascade")


def pyramidal_twin(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Pyramidal Flow twin of a DFM config: one pyramid level per DFM stage, one halving
  between levels, the coarsest patch scaled so the token grid is unchanged, equal window shares
  and the DFM's total sampling steps split equally over the windows (earlier windows take any
  remainder)."""
  if c.decomposition.halve_time:
    raise ValueError("the pyramidal twin halves space only: drop decomposition.halve_time")
  c, stages, levels, total = _twin(c, "pyramidal_flow", lambda value, name: value)
  c.model.patch_size = c.model.patch_size * 2 ** (levels - (stages - 1))
  c.model.precondition = False
  c.decomposition.kind = "laplacian"
  c.decomposition.level_gaps = ()
  c.decomposition.standardize = False
  c.flow.stage_probs = (1.0 / stages,) * stages
  c.sampler.steps_per_stage = tuple(total // stages + (k < total % stages) for k in range(stages))
  c.sampler.thresholds = tuple((k + 1) / stages for k in range(stages - 1))
  c.sampler.solver = "euler"
  return c


def parse_variants(arg: str | None, allowed: tuple[str, ...]) -> set[str]:
  """The comma-separated variants of a config argument, e.g. ``'fm,runlocal'``."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()} - {"dfm"}
  if "fm" in allowed:
    allowed = tuple(allowed) + tuple(v for v in FM_SIBLINGS if v not in allowed)
  unknown = variants - set(allowed)
  if unknown:
    raise ValueError(
      f"unknown config variant(s) {sorted(unknown)}; choose from "
      f"{', '.join(('dfm',) + tuple(allowed))} (comma-separated)"
    )
  return variants


def apply_variants(c: ml_collections.ConfigDict, variants: set[str]) -> ml_collections.ConfigDict:
  """Applies the shared variants (one method twin: ``fm``, ``pyramidal`` or ``cascade``, then
  ``runlocal``) in a fixed order."""
  twins = sorted(variants & {"fm", *FM_SIBLINGS})
  if len(twins) > 1:
    raise ValueError(
      f"config variants {' and '.join(repr(t) for t in twins)} are alternatives: choose one"
    )
  if "fm" in variants:
    c = flow_matching_twin(c)
  if "pyramidal" in variants:
    c = pyramidal_twin(c)
  if "cascade" in variants:
    c = cascade_twin(c)
  if "runlocal" in variants:
    c = runlocal(c)
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Seconds per run on a CPU: a one-block, 32-wide model, batch 8, 6 steps, checkpoints every
  2 steps, 1-2 sampling steps per stage, videos cut to the frames that keep 2,048 tokens or
  fewer (a laptop cannot attend over a 13-frame clip's 13,312); the stages and each frame's token
  grid are unchanged.

  Training data in a bucket (a ``gs://`` path, such as the big configs' placeholder) is replaced
  by synthetic data of the same shapes and classes
  (``data.source`` ``synthetic`` or ``synthetic_latents``), and autoencoder weights that are not
  on this machine by a small random stand-in with the same latent shape
  (``autoencoder.weights = "stand-in"``): the config's runlocal variant then trains, saves and
  samples anywhere, as a smoke test of its shapes and code paths."""
  _local_stand_ins(c)
  c.total_steps = 6
  c.batch_size = 8
  c.log_every = 2
  c.checkpoint_every = 2
  c.sample_every = 1000
  c.num_grid_samples = 10
  c.keep_checkpoints = 10
  c.model.size = "custom"
  c.model.hidden_size = 32
  c.model.depth = 1
  c.model.num_heads = 2
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.remat_policy = "none"
  c.optim.grad_accum_steps = 1
  c.optim.warmup_steps = 2
  c.decomposition.stats_batches = 2
  frames = _runlocal_frames(c)
  for block in (c.data, c.get("encode", {}).get("data"), c.eval.get("reference")):
    if block is not None and block.get("frames", 0) > frames:
      block.frames = frames
  stages = len(c.sampler.steps_per_stage)
  c.sampler.steps_per_stage = (2,) + (1,) * (stages - 1)
  c.sampler.num_samples = 12
  c.sampler.batch_size = 6
  c.eval.num_samples = 20
  c.eval.num_real = 40
  c.eval.batch_size = 10
  c.eval.train_num_samples = 20
  c.data.num_workers = 0
  return c


def from_saved(saved: dict, target=None) -> ml_collections.ConfigDict:
  """A run's saved ``config.json`` (a dict) as a complete config: the defaults with the saved
  values over them (a run saved before a field existed gets today's default), one process,
  and no ``init_from``. ``target`` (a config): take its mesh and distributed blocks (the saved
  run is rebuilt on the target's devices); None: every device data-parallel."""
  c = base_config()
  c.update(saved)
  if target is not None:
    c.mesh = ml_collections.ConfigDict(target.mesh.to_dict())
    c.distributed = ml_collections.ConfigDict(target.distributed.to_dict())
  else:
    c.mesh.shape, c.mesh.dcn_shape = (-1, 1, 1), (1, 1, 1)
    c.distributed.initialize = False
  c.init_from = ""
  return c


def differences(config: ml_collections.ConfigDict) -> list[str]:
  """``field = value`` for every field of ``config`` that is not `base_config`'s default (or
  that the defaults lack), sorted by name: a run's settings in a few lines."""
  from dfm_jax import config_schema  # pylint: disable=g-import-not-at-top

  import json  # pylint: disable=g-import-not-at-top

  def same(a, b) -> bool:  # a config read back from JSON holds lists where tuples were
    return json.dumps(a, default=str) == json.dumps(b, default=str)

  defaults = config_schema.leaves(base_config())
  out = []
  for name, value in sorted(config_schema.leaves(config).items()):
    if name not in defaults or not same(defaults[name], value):
      out.append(f"{name} = {value!r}")
  return out


def _local_stand_ins(c: ml_collections.ConfigDict) -> None:
  """``runlocal``'s synthetic data and stand-in autoencoder for what is not on this machine."""
  import os  # pylint: disable=g-import-not-at-top

  from absl import logging  # pylint: disable=g-import-not-at-top

  from dfm_jax.autoencoders import STAND_IN  # pylint: disable=g-import-not-at-top

  path = str(c.data.get("path", ""))
  if storage.is_remote(path):
    source = "synthetic_latents" if c.data.source == "latents" else "synthetic"
    logging.warning(
      "runlocal: data.path %s is not on this machine; training on data.source=%r (the same "
      "shapes and classes)",
      path,
      source,
    )
    c.data.source = source
    for field in data_lib.sources.LOCATION_FIELDS:
      c.data[field] = None if field == "data_dir" else ""
  ae = c.get("autoencoder")
  weights = str(ae.get("weights", "")) if ae is not None else ""
  if (
    weights and weights != STAND_IN and (storage.is_remote(weights) or not os.path.exists(weights))
  ):
    logging.warning(
      "runlocal: autoencoder.weights %s is not on this machine; a small random stand-in with "
      "%s's latent shape decodes the samples (they are not images)",
      weights,
      ae.kind,
    )
    ae.weights = STAND_IN


RUNLOCAL_TOKENS = 2048  # attention over one runlocal clip: about a minute on a laptop CPU


def _runlocal_frames(c: ml_collections.ConfigDict) -> int:
  """The most frames a runlocal clip keeps: all of them while frames x the coarse stage's tokens
  per frame stay within `RUNLOCAL_TOKENS`, else fewer (even, for halved time; at least 2)."""
  frames = int(c.data.get("frames", 0))
  coarse = int(c.data.resolution) // 2 ** (int(c.decomposition.num_stages) - 1)
  per_frame = max(1, (coarse // max(1, int(c.model.patch_size))) ** 2)
  if frames * per_frame <= RUNLOCAL_TOKENS:
    return frames
  return max(2, (RUNLOCAL_TOKENS // per_frame) // 2 * 2)
