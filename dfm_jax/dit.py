"""The DFM DiT (Flax NNX): a DiT with adaLN-Zero and per-stage inputs, time embedders and heads.

Every stage s gets its own patch embedding, chosen so that all stages yield the same token grid
(stage 1 with ``patch_size``, finer stages with proportionally larger patches); the embeddings
are summed into one token sequence. Per-stage timestep embedders are summed, with the class
embedding (and optionally a stage-index embedding), into the adaLN conditioning. Each stage has
its own zero-initialised output head. With one stage this is exactly a DiT.

Images: stage arrays ``[B, H_s, W_s, C_s]``; videos ``[B, T_s, H_s, W_s, C_s]`` (frames are
patchified independently unless the decomposition also halves time, in which case finer stages
use a temporal patch too). Times ``t [B, S]`` follow t = 0 noise, t = 1 data.

With ``cond_image`` on (the cascade baseline's full-resolution model), an extra patchify layer
embeds a conditioning image of the finest stage's shape with that stage's patch; its tokens are
appended to the stage tokens (same grid positions), its t to its own time embedder, and the heads
read the stage tokens only.

With ``precondition`` on, the network is wrapped in per-stage EDM-style input/output scaling
(:mod:`dfm_jax.precondition`) using the per-stage data statistics the model stores as
:class:`DataStats` variables (part of the checkpoint, not trained, not averaged by the EMA).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dfm_jax import positions, precondition, sharding
from dfm_jax.attention import (
  ATTENTIONS,
  attention_unsupported,
  compile_platform,
  resolve_attention,
  splash_attention,
)

# Standard DiT sizes: (hidden size, depth, heads).
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Rematerialisation of each scanned block (``model.remat_policy``): 'none' keeps every
# activation for the backward pass; 'full' recomputes the whole block; the others save only
# what the named jax.checkpoint_policies policy keeps (matmul outputs; matmul outputs without a
# batch dimension, i.e. not the attention logits; the attention output 'attention_out').
REMAT_POLICIES = (
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "save_attention_out",
)
# The loss under preconditioning (DiTConfig.loss_weighting).
LOSS_WEIGHTINGS = ("edm", "velocity")
# Logical names of the token activations [B, N, D] inside the blocks (see mesh.axis_rules).
ACTIVATION_AXES = ("batch", "tokens", "embed_act")


def remat_policy_fn(name: str):
  """The ``jax.checkpoint`` policy of a ``REMAT_POLICIES`` name ('full': save nothing)."""
  policies = jax.checkpoint_policies
  return {
    "full": policies.nothing_saveable,
    "dots_saveable": policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": policies.save_only_these_names("attention_out"),
  }[name]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Model hyperparameters. ``stage_shapes`` exclude the batch axis, coarse to fine."""

  stage_shapes: tuple[tuple[int, ...], ...]
  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 1000  # the null class (for classifier-free guidance) is index num_classes
  pos_embed: str = "rope"  # 'rope' or 'sincos'
  stage_index_embed: bool = True
  dtype: str = "float32"  # compute dtype; parameters and norm statistics stay float32
  # dtype of the residual stream between blocks (and of the scan carry). 'bfloat16' halves the
  # memory traffic of the elementwise work around each block (norms, modulation, gated adds),
  # which bounds the step time on GPUs; the adds themselves are computed in float32.
  residual_dtype: str = "float32"
  # Deprecated alias: remat=True with remat_policy 'none' means remat_policy 'full'; after
  # construction remat is True exactly when remat_policy is not 'none'.
  remat: bool = False
  remat_policy: str = "none"  # one of REMAT_POLICIES
  attention: str = "auto"  # one of ATTENTIONS
  # (logical name, mesh axis or axes or None) pairs, e.g. mesh.axis_rules: the token activations
  # [B, N, D] are constrained to ACTIVATION_AXES mapped through them, under a mesh only. () (or
  # rules without those names): no constraint.
  activation_rules: tuple = ()
  # Blocks per scan iteration; 0 = auto: all of them (no loop) on GPUs, where the loop's
  # stacking of the saved activations cost DiT-XL/2 on an H100 27% of its step time and half of
  # its activation memory, and on CPUs, where the loop made the default config's step 1.26x
  # slower than a plain-JAX DiT's (bench/overhead.py; unrolled 0.98x); 1 on TPUs (compile time
  # independent of depth; the compiler unrolls by itself where it pays). XLA's cost analysis
  # counts a loop body once, so FLOP counts need scan_unroll = depth (benchmarks do this).
  scan_unroll: int = 0
  time_scale: float = 1000.0  # t in [0, 1] is multiplied by this before the sinusoid
  freq_dim: int = 256
  # Per-stage EDM-style input/output scaling from the stored data statistics (see
  # dfm_jax.precondition); the run configs turn it on (model.precondition).
  precondition: bool = False
  # The loss under preconditioning: "edm" weights each stage's data-space velocity error by
  # 1 / c_out(t)^2 (the unit-variance regression of the network, EDM's weighting); "velocity"
  # leaves it unweighted (the paper's velocity MSE, equal to training without preconditioning).
  loss_weighting: str = "edm"
  # An extra patchify layer and time embedder for a conditioning image [*stage_shapes[-1]]
  # whose tokens are concatenated with the stage tokens (the cascade baseline).
  cond_image: bool = False

  def __post_init__(self):
    object.__setattr__(
      self, "stage_shapes", tuple(tuple(int(d) for d in s) for s in self.stage_shapes)
    )
    rules = tuple(
      (str(name), tuple(axis) if isinstance(axis, (tuple, list)) else axis)
      for name, axis in self.activation_rules
    )
    object.__setattr__(self, "activation_rules", rules)
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(
        f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {self.loss_weighting!r}"
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"remat_policy must be one of {', '.join(REMAT_POLICIES)}, got {self.remat_policy!r}"
      )
    if self.remat and self.remat_policy == "none":
      object.__setattr__(self, "remat_policy", "full")
    object.__setattr__(self, "remat", self.remat_policy != "none")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
    if self.pos_embed not in ("rope", "sincos"):
      raise ValueError(f"pos_embed must be 'rope' or 'sincos', got {self.pos_embed!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.residual_dtype not in DTYPES:
      raise ValueError(
        f"residual_dtype must be one of {sorted(DTYPES)}, got {self.residual_dtype!r}"
      )
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )
    if self.scan_unroll < 0 or (self.scan_unroll and self.depth % self.scan_unroll):
      raise ValueError(
        f"scan_unroll must be 0 (auto) or a positive divisor of depth {self.depth}, "
        f"got {self.scan_unroll}"
      )
    token_layout(self.stage_shapes, self.patch_size)  # validates the patch geometry
    if self.attention in ("cudnn", "splash"):
      why = attention_unsupported(self, self.attention)
      if why:
        raise ValueError(f"attention {self.attention!r} does not apply to this model: {why}")

  @property
  def num_stages(self) -> int:
    return len(self.stage_shapes)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_tokens(self) -> int:
    return int(np.prod(token_layout(self.stage_shapes, self.patch_size)[0]))

  def train_flops_per_sample(self) -> float:
    """Model FLOPs of one training sample (what MFU counts): 3 x the forward's matmuls and
    attention (the backward costs twice the forward; remat's recomputation is not counted).
    Per block ``2 N (4 + 2 r) D^2 + 4 N^2 D`` for N tokens of width D, MLP ratio r; plus each
    stage's patch embedding and output head."""
    n, d, r = self.num_tokens, self.hidden_size, self.mlp_ratio
    block = 2 * n * (4 + 2 * r) * d * d + 4 * n * n * d
    io = sum(2 * 2 * int(np.prod(s)) * d for s in self.stage_shapes)
    return 3.0 * (self.depth * block + io)

  @classmethod
  def from_size(cls, size: str, **kw) -> "DiTConfig":
    if size not in SIZES:
      raise ValueError(f"unknown DiT size {size!r}; choose one of {', '.join(SIZES)}")
    hidden, depth, heads = SIZES[size]
    return cls(hidden_size=hidden, depth=depth, num_heads=heads, **kw)


def scan_unroll(cfg: DiTConfig, platform: str | None = None) -> int:
  """Blocks per scan iteration on ``platform`` (default: the devices being compiled for):
  ``cfg.scan_unroll``, or for 0 (auto) the whole depth on GPUs and CPUs and 1 on TPUs."""
  if cfg.scan_unroll:
    return cfg.scan_unroll
  return cfg.depth if (platform or compile_platform()) in ("gpu", "cuda", "cpu") else 1


def constrain_activations(x: jax.Array, cfg: DiTConfig) -> jax.Array:
  """``x [B, N, D]`` under ``with_sharding_constraint`` to ``ACTIVATION_AXES`` mapped through
  ``cfg.activation_rules``; unchanged outside a mesh or without rules for those names."""
  rules = dict(cfg.activation_rules)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(name in rules for name in ACTIVATION_AXES):
    return x
  spec = sharding.activation_spec(ACTIVATION_AXES, x.shape, cfg.activation_rules, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def token_layout(
  stage_shapes: Sequence[Sequence[int]], patch_size: int
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
  """The shared token grid and each stage's patch size per grid axis.

  Images use a 2D grid ``(H_1 / p, W_1 / p)``; videos a 3D grid ``(T_1, H_1 / p, W_1 / p)``.
  Raises ValueError when stages cannot all be cut into the same number of tokens.
  """
  first = stage_shapes[0]
  if len(first) not in (3, 4):
    raise ValueError(f"stage shapes must be [H, W, C] or [T, H, W, C], got {first}")
  spatial0 = first[-3:-1]
  for d in spatial0:
    if d < patch_size or d % patch_size:
      raise ValueError(
        f"the coarsest stage {tuple(first)} cannot be cut into {patch_size}x{patch_size} "
        f"patches: its spatial size must be a positive multiple of the patch size"
      )
  base = ((1,) if len(first) == 4 else ()) + (patch_size, patch_size)
  grid = tuple(d // p for d, p in zip(first[:-1], base))
  patches = []
  for shape in stage_shapes:
    if len(shape) != len(first):
      raise ValueError(f"all stages must have the same rank, got {tuple(stage_shapes)}")
    patch = []
    for d, g in zip(shape[:-1], grid):
      if d % g:
        raise ValueError(
          f"stage of shape {tuple(shape)} cannot give the same token grid {grid} as the "
          f"coarsest stage (size {d} is not a multiple of {g}); every stage must be an "
          f"integer multiple of the coarsest stage's grid"
        )
      patch.append(d // g)
    patches.append(tuple(patch))
  return grid, tuple(patches)


def patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
  """``[B, d_1..d_k, C]`` -> ``[B, N, prod(patch) * C]`` with row-major tokens."""
  b, *dims, c = x.shape
  k = len(dims)
  grid = [d // p for d, p in zip(dims, patch)]
  shape = [b] + [v for g, p in zip(grid, patch) for v in (g, p)] + [c]
  x = x.reshape(shape)
  perm = [0] + [1 + 2 * i for i in range(k)] + [2 + 2 * i for i in range(k)] + [1 + 2 * k]
  return x.transpose(perm).reshape(b, int(np.prod(grid)), -1)


def unpatchify(
  tokens: jax.Array, grid: Sequence[int], patch: Sequence[int], channels: int
) -> jax.Array:
  """Inverse of :func:`patchify`: ``[B, N, prod(patch) * C]`` -> ``[B, d_1..d_k, C]``."""
  b = tokens.shape[0]
  k = len(grid)
  x = tokens.reshape([b] + list(grid) + list(patch) + [channels])
  perm = [0] + [v for i in range(k) for v in (1 + i, 1 + k + i)] + [1 + 2 * k]
  return x.transpose(perm).reshape([b] + [g * p for g, p in zip(grid, patch)] + [channels])


def _dense(rngs, din, dout, names, *, init="xavier", dtype=jnp.float32, use_bias=True):
  inits = {
    "xavier": nnx.initializers.xavier_uniform(),
    "zeros": nnx.initializers.zeros_init(),
    "normal": nnx.initializers.normal(0.02),
  }
  return nnx.Linear(
    din,
    dout,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nnx.with_partitioning(inits[init], names, eager_sharding=False),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:], eager_sharding=False),
    rngs=rngs,
  )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Parameter-free LayerNorm over the last axis, computed in float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DataStats(nnx.Variable):
  """Per-stage data statistics (mean or std, ``[S]`` float32): saved with the checkpoint, but
  not an ``nnx.Param``, so neither the optimizer nor the EMA update touches them."""


class TimestepEmbedder(nnx.Module):
  """``t [B]`` in [0, 1] -> ``[B, D]`` via sinusoidal features of ``t * time_scale`` and an MLP."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.time_scale = cfg.time_scale
    self.freq_dim = cfg.freq_dim
    self.fc1 = _dense(rngs, cfg.freq_dim, cfg.hidden_size, (None, "embed"), init="normal")
    self.fc2 = _dense(rngs, cfg.hidden_size, cfg.hidden_size, ("mlp", "embed"), init="normal")

  def __call__(self, t):
    h = positions.timestep_embedding(t * self.time_scale, self.freq_dim)
    return self.fc2(nnx.silu(self.fc1(h)))


class Attention(nnx.Module):
  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.num_heads = cfg.num_heads
    self.cfg = cfg
    self.qkv = _dense(rngs, cfg.hidden_size, 3 * cfg.hidden_size, ("embed", "heads"), dtype=dtype)
    self.proj = _dense(rngs, cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), dtype=dtype)

  def __call__(self, x, rope):
    b, n, d = x.shape
    q, k, v = jnp.split(
      self.qkv(x).reshape(b, n, 3 * self.num_heads, d // self.num_heads), 3, axis=2
    )
    if rope is not None:
      q = positions.apply_rope(q, *rope)
      k = positions.apply_rope(k, *rope)
    impl = resolve_attention(self.cfg)
    if impl == "splash":
      out = splash_attention(q, k, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    out = checkpoint_name(out, "attention_out")
    return self.proj(out.reshape(b, n, d))


class MLP(nnx.Module):
  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    hidden = int(cfg.hidden_size * cfg.mlp_ratio)
    self.fc1 = _dense(rngs, cfg.hidden_size, hidden, ("embed", "mlp"), dtype=dtype)
    self.fc2 = _dense(rngs, hidden, cfg.hidden_size, ("mlp", "embed"), dtype=dtype)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
  """adaLN-Zero transformer block on a residual stream of ``cfg.residual_dtype``."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.dtype = DTYPES[cfg.dtype]
    self.residual_dtype = DTYPES[cfg.residual_dtype]
    self.attn = Attention(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.ada = _dense(rngs, cfg.hidden_size, 6 * cfg.hidden_size, ("embed", "mlp"), init="zeros")

  def __call__(self, x, c, rope):
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(nnx.silu(c)), 6, axis=-1)
    h = modulate(layer_norm(x), shift1, scale1).astype(self.dtype)
    x = (x + gate1[:, None, :] * self.attn(h, rope).astype(jnp.float32)).astype(self.residual_dtype)
    h = modulate(layer_norm(x), shift2, scale2).astype(self.dtype)
    x = x + gate2[:, None, :] * self.mlp(h).astype(jnp.float32)
    return x.astype(self.residual_dtype)


class StageHead(nnx.Module):
  """Final adaLN + zero-initialised linear + unpatchify for one stage."""

  def __init__(self, cfg: DiTConfig, out_dim: int, rngs: nnx.Rngs):
    self.ada = _dense(rngs, cfg.hidden_size, 2 * cfg.hidden_size, ("embed", "mlp"), init="zeros")
    self.linear = _dense(rngs, cfg.hidden_size, out_dim, ("embed", None), init="zeros")

  def __call__(self, x, c):
    shift, scale = jnp.split(self.ada(nnx.silu(c)), 2, axis=-1)
    return self.linear(modulate(layer_norm(x), shift, scale))


class DFMDiT(nnx.Module):
  """The DFM DiT. ``S = 1`` is a plain class-conditional DiT.

  Call: ``model(stages, t, labels, stage_index)`` with ``stages`` a tuple of S noisy stage
  arrays ``[B, *stage_shapes[s]]``, ``t [B, S]``, ``labels`` int ``[B]`` (``num_classes`` is the
  null class) and ``stage_index`` int ``[B]`` (the main / most recently started stage, 0-based;
  ignored unless ``stage_index_embed``). Returns a tuple of S float32 velocities, one per stage,
  in data space (t = 0 noise, t = 1 data; target ``x1 - x0``).

  With ``cfg.precondition`` the call returns ``m + c_skip * xc + c_out * F(c_in * xc, ...)``
  per stage (``xc = x_t - t m``), where ``data_mean`` / ``data_std`` (``[S]``) hold the stage
  statistics (set them with :meth:`set_data_stats`); train with :meth:`loss_weights`.

  With ``cfg.cond_image``, ``cond [B, *stage_shapes[-1]]`` (a noisy image, ``cond = t_c x1 +
  (1 - t_c) x0``) and ``cond_t [B]`` (its t_c) may be passed: its N tokens follow the N stage
  tokens, and with preconditioning it is centred and scaled with stage 1's statistics.
  """

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.grid, self.patches = token_layout(cfg.stage_shapes, cfg.patch_size)
    d = cfg.hidden_size
    self.embedders = nnx.List(
      [
        _dense(rngs, int(np.prod(p)) * shape[-1], d, ("patch", "embed"))
        for p, shape in zip(self.patches, cfg.stage_shapes)
      ]
    )
    self.time_embedders = nnx.List([TimestepEmbedder(cfg, rngs) for _ in cfg.stage_shapes])
    self.label_embed = nnx.Embed(
      cfg.num_classes + 1,
      d,
      param_dtype=jnp.float32,
      rngs=rngs,
      embedding_init=nnx.with_partitioning(
        nnx.initializers.normal(0.02), ("vocab", "embed"), eager_sharding=False
      ),
    )
    self.stage_embed = (
      nnx.Embed(
        cfg.num_stages,
        d,
        param_dtype=jnp.float32,
        rngs=rngs,
        embedding_init=nnx.with_partitioning(
          nnx.initializers.normal(0.02), (None, "embed"), eager_sharding=False
        ),
      )
      if cfg.stage_index_embed
      else None
    )

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return DiTBlock(cfg, rngs)

    # One DiTBlock whose parameters carry a leading [depth] axis (logical name 'layers'), run by
    # a scan in __call__: compile time does not grow with depth.
    self.blocks = make_blocks(rngs)
    self.heads = nnx.List(
      [
        StageHead(cfg, int(np.prod(p)) * shape[-1], rngs)
        for p, shape in zip(self.patches, cfg.stage_shapes)
      ]
    )
    if cfg.pos_embed == "sincos":
      self.pos = nnx.Cache(jnp.asarray(positions.sincos_embedding(d, self.grid)))
    else:
      cos, sin = positions.rope_frequencies(d // cfg.num_heads, self.grid)
      self.rope_cos = nnx.Cache(jnp.asarray(cos))
      self.rope_sin = nnx.Cache(jnp.asarray(sin))
    # Always present (also with precondition off), so every checkpoint records the statistics.
    self.data_mean = DataStats(jnp.zeros((cfg.num_stages,), jnp.float32))
    self.data_std = DataStats(jnp.ones((cfg.num_stages,), jnp.float32))
    if cfg.cond_image:  # made last, so the other layers initialise as without it
      din = int(np.prod(self.patches[-1])) * cfg.stage_shapes[-1][-1]
      self.cond_embedder = _dense(rngs, din, d, ("patch", "embed"))
      self.cond_time_embedder = TimestepEmbedder(cfg, rngs)

  def set_data_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
    """Stores per-stage data statistics ``mean, std [S]`` (of the stages the model is fed)."""
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    s = self.cfg.num_stages
    if mean.shape != (s,) or std.shape != (s,):
      raise ValueError(
        f"data statistics need one mean and one std per stage ({s}), got "
        f"{mean.shape[0]} means and {std.shape[0]} stds"
      )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
      raise ValueError(
        f"data statistics must be finite with std > 0, got mean {mean.tolist()}, std {std.tolist()}"
      )
    self.data_mean[...] = jnp.asarray(mean)
    self.data_std[...] = jnp.asarray(std)

  def loss_weights(self, t: jax.Array) -> jax.Array:
    """Per-sample, per-stage loss weights ``[B, S]`` for ``t [B, S]`` (t = 0 noise, t = 1 data):
    ``1 / c_out(t)^2`` with preconditioning and ``loss_weighting="edm"`` (the unit-variance
    regression of the network), else ones (the data-space velocity MSE)."""
    if not self.cfg.precondition or self.cfg.loss_weighting == "velocity":
      return jnp.ones(t.shape, jnp.float32)
    return precondition.loss_weights(t, self.data_std[...])

  def __call__(
    self,
    stages: Sequence[jax.Array],
    t: jax.Array,
    labels: jax.Array,
    stage_index: jax.Array | None = None,
    cond: jax.Array | None = None,
    cond_t: jax.Array | None = None,
  ) -> tuple[jax.Array, ...]:
    cfg = self.cfg
    if (cond is None) != (cond_t is None):
      raise ValueError("pass both cond and cond_t, or neither")
    if cond is not None and not cfg.cond_image:
      raise ValueError("this model takes no conditioning image (DiTConfig.cond_image is off)")
    if cond is not None and tuple(cond.shape[1:]) != cfg.stage_shapes[-1]:
      raise ValueError(
        f"conditioning image of shape {cond.shape[1:]} does not match the finest stage "
        f"{cfg.stage_shapes[-1]}"
      )
    if len(stages) != cfg.num_stages:
      raise ValueError(f"model has {cfg.num_stages} stages, got {len(stages)} inputs")
    for x, shape in zip(stages, cfg.stage_shapes):
      if tuple(x.shape[1:]) != shape:
        raise ValueError(
          f"stage input of shape {x.shape[1:]} does not match the model's stage shape {shape}"
        )
    if not cfg.precondition:
      return self.network(stages, t, labels, stage_index, cond, cond_t)
    mean, std = self.data_mean[...], self.data_std[...]
    centred, inputs = precondition.network_inputs(stages, t, mean, std)
    if cond is not None:
      (cond,) = precondition.network_inputs((cond,), cond_t[:, None], mean[:1], std[:1])[1]
    raw = self.network(inputs, t, labels, stage_index, cond, cond_t)
    return precondition.data_velocities(raw, centred, t, mean, std)

  def network(
    self,
    stages: Sequence[jax.Array],
    t: jax.Array,
    labels: jax.Array,
    stage_index: jax.Array | None = None,
    cond: jax.Array | None = None,
    cond_t: jax.Array | None = None,
  ) -> tuple[jax.Array, ...]:
    """The raw network F: same arguments as ``__call__``, no preconditioning (the stage and
    conditioning inputs are taken as given); returns S float32 outputs ``[B, *stage_shapes[s]]``."""
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    with jax.named_scope("patch_embed"):
      x = sum(
        emb(patchify(s.astype(dtype), p)).astype(jnp.float32)
        for emb, s, p in zip(self.embedders, stages, self.patches)
      )
      num_tokens = x.shape[1]
      if cond is not None:  # appended at the same grid positions as the stage tokens
        cond_tokens = self.cond_embedder(patchify(cond.astype(dtype), self.patches[-1]))
        x = jnp.concatenate([x, cond_tokens.astype(jnp.float32)], axis=1)
    repeat = x.shape[1] // num_tokens
    with jax.named_scope("conditioning"):
      c = self.label_embed(labels)
      for s, temb in enumerate(self.time_embedders):
        c = c + temb(t[:, s])
      if self.stage_embed is not None:
        if stage_index is None:
          raise ValueError("this model embeds the stage index: pass stage_index")
        c = c + self.stage_embed(stage_index)
      if cond is not None:
        c = c + self.cond_time_embedder(cond_t)
    rope = None
    if cfg.pos_embed == "sincos":
      x = x + jnp.tile(self.pos[...], (repeat, 1))[None]
    else:
      rope = tuple(jnp.tile(a[...], (repeat, 1)) for a in (self.rope_cos, self.rope_sin))

    # A plain lax.scan over the stacked parameters (not nnx.scan, which refuses a model whose
    # variables come from an enclosing trace, as in the sampler's scan).
    block_def, block_params = nnx.split(self.blocks)

    def apply_block(x, params):
      with jax.named_scope("dit_block"):
        x = constrain_activations(x, cfg)
        x = nnx.merge(block_def, params)(x, c, rope)
        return constrain_activations(x, cfg), None

    if cfg.remat_policy != "none":
      apply_block = jax.checkpoint(apply_block, policy=remat_policy_fn(cfg.remat_policy))
    x = x.astype(DTYPES[cfg.residual_dtype])
    x, _ = jax.lax.scan(apply_block, x, block_params, unroll=scan_unroll(cfg))
    x = x[:, :num_tokens]
    out = []
    with jax.named_scope("stage_heads"):
      for head, p, shape in zip(self.heads, self.patches, cfg.stage_shapes):
        out.append(unpatchify(head(x, c).astype(jnp.float32), self.grid, p, shape[-1]))
    return tuple(out)


def parameter_summary(model: nnx.Module) -> str:
  """A table of parameter counts per top-level module and the total."""
  params = nnx.state(model, nnx.Param)
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = str(getattr(path[0], "key", getattr(path[0], "name", path[0])))
    counts[top] = counts.get(top, 0) + int(np.prod(leaf.shape))
  total = sum(counts.values())
  width = max(len(k) for k in counts) + 2
  lines = [f"{'module':<{width}}{'params':>14}"]
  lines += [f"{k:<{width}}{v:>14,}" for k, v in counts.items()]
  lines.append(f"{'total':<{width}}{total:>14,}  ({total / 1e6:.2f}M)")
  return "\n".join(lines)


def count_parameters(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
