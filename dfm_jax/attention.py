"""Which attention kernel runs the DiT's attention (``model.attention``), and the TPU splash
kernel itself.

Shapes: ``q, k, v [B, N, H, Dh]``. The choice is checked against the model (token count, head
size, dtype) and the platform; ``auto`` takes the platform's fused kernel where it applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dfm_jax import sharding

# Attention implementations (``model.attention``): 'xla' is jax.nn.dot_product_attention's XLA
# path; 'cudnn' its cuDNN fused kernel (GPUs, bfloat16, head_dim a multiple of 8 up to 128);
# 'splash' the Pallas TPU splash-attention kernel (TPUs, token count and head_dim multiples of
# 128); 'auto' picks the fused kernel of the platform where its constraints hold, else 'xla'.
ATTENTIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_MULTIPLE = 128  # splash attention: token count and head_dim multiples of this


ATTENTION_PLATFORMS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}


def attention_unsupported(cfg, impl: str) -> str:
  """Why the kernel ``impl`` cannot run this model's attention ('' when it can; platform aside)."""
  if impl == "cudnn":
    if cfg.dtype != "bfloat16":
      return f"cuDNN attention needs model.dtype 'bfloat16', got {cfg.dtype!r}"
    if cfg.head_dim % 8 or cfg.head_dim > 128:
      return f"cuDNN attention needs head_dim a multiple of 8 up to 128, got {cfg.head_dim}"
  if impl == "splash":
    m = SPLASH_MULTIPLE
    if cfg.head_dim % m:
      return f"splash attention needs head_dim a multiple of {m}, got {cfg.head_dim}"
    if cfg.num_tokens % m:
      return f"splash attention needs a token count that is a multiple of {m}, got {cfg.num_tokens}"
  return ""


def check_attention_platform(attention: str, platform: str) -> None:
  """Raises ValueError when ``attention`` (explicit 'cudnn' / 'splash') cannot run on the
  devices' ``platform`` ('cpu', 'gpu', 'cuda', 'tpu', ...)."""
  allowed = ATTENTION_PLATFORMS.get(attention)
  if allowed and platform not in allowed:
    raise ValueError(
      f"model.attention {attention!r} runs on {' / '.join(allowed)} devices only, these are "
      f"{platform!r}: use 'auto' (the platform's fused kernel where it applies, else XLA) or 'xla'"
    )


def compile_platform() -> str:
  """The platform of the devices being compiled for: the current mesh's (``jax.set_mesh``, also
  compile-only TPU devices; read from the abstract mesh, which works inside a trace), else the
  default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_attention(cfg, platform: str | None = None) -> str:
  """The implementation used on ``platform`` (default: :func:`compile_platform`): 'auto' becomes
  'splash' on TPUs and 'cudnn' on GPUs where :func:`attention_unsupported` allows, else 'xla'."""
  platform = platform or compile_platform()
  if cfg.attention != "auto":
    check_attention_platform(cfg.attention, platform)
    return cfg.attention
  for impl, platforms in ATTENTION_PLATFORMS.items():
    if platform in platforms and not attention_unsupported(cfg, impl):
      return impl
  return "xla"


def splash_attention(q, k, v, *, interpret: bool = False) -> jax.Array:
  """Non-causal attention ``q, k, v [B, N, H, hd] -> [B, N, H, hd]`` with the Pallas TPU splash
  kernel (N and hd multiples of 128). Under a mesh the kernel runs in a ``shard_map`` with the
  batch split over (data, fsdp) and the heads over tensor where those divide; ``interpret`` runs
  the kernel in the Pallas interpreter (any platform, for tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
    splash_attention_kernel as sk,
    splash_attention_mask as sm,
  )

  b, n, h, hd = q.shape
  block = min(512, n) if n % min(512, n) == 0 else SPLASH_MULTIPLE
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )

  def local(q, k, v):
    heads = q.shape[2]
    mask = sm.MultiHeadMask([sm.FullMask((n, n)) for _ in range(heads)])
    kernel = sk.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    # The kernel takes one example [H, N, hd] and does not scale the logits.
    qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q * (hd**-0.5), k, v))
    return jnp.swapaxes(jax.vmap(kernel)(qt, kt, vt), 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v)
  spec = sharding.activation_spec(
    ("batch", None, "heads_act", None),
    q.shape,
    (("batch", sharding.BATCH_AXES), ("heads_act", "tensor")),
    mesh,
    undivisible=None,
  )
  return jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
