"""KL autoencoders (the "VAE" of Stable Diffusion, SDXL and FLUX.1) in Flax NNX, NHWC.

Architecture as diffusers' ``AutoencoderKL`` / the original LDM and FLUX ``AutoEncoder``:

* encoder: 3x3 ``conv_in``; per level ``layers_per_block`` ResNet blocks (GroupNorm
  (``norm_groups``, eps 1e-6) + SiLU + 3x3 conv, twice; a 1x1 shortcut where the width
  changes) and, except on the last level, a stride-2 3x3 conv after zero padding
  (0, 1) on H and W (diffusers' / LDM's asymmetric padding); a mid block (ResNet, single-head
  self-attention over all positions with its own GroupNorm and a residual, ResNet); GroupNorm,
  SiLU, 3x3 ``conv_out`` to 2 * latent channels (mean and log-variance); an optional 1x1
  ``quant_conv``.
* decoder: optional 1x1 ``post_quant_conv``; ``conv_in``; mid block; per level (widest first)
  ``layers_per_block + 1`` ResNet blocks and, except on the last, nearest 2x upsampling and a
  3x3 conv; GroupNorm, SiLU, ``conv_out`` to RGB.

`encode` uses the posterior mean (no sampling) and returns ``(mean - shift) * scale``.
Parameter names follow the diffusers layout; `original_key` maps them to the original LDM /
FLUX ``ae.safetensors`` names (``encoder.down.0.block.0.conv1.weight``,
``encoder.mid.attn_1.q.weight`` stored as 1x1 conv weights, the decoder's ``up.{i}`` counted
from the full-resolution level).

Presets (registered names; the public configs: diffusers ``AutoencoderKL`` configs of
SD 1.x/2.x, SDXL and FLUX.1-dev/schnell ``vae/config.json``, FLUX ``AutoEncoderParams``):

=======  ========  =====================  ==============  =======  ======  ===========
name     latent C  block_out_channels     layers / level  scale    shift   quant convs
=======  ========  =====================  ==============  =======  ======  ===========
sd       4         (128, 256, 512, 512)   2               0.18215  0       yes
sdxl     4         (128, 256, 512, 512)   2               0.13025  0       yes
flux1    16        (128, 256, 512, 512)   2               0.3611   0.1159  no
=======  ========  =====================  ==============  =======  ======  ===========

``kl`` builds any architecture from options (``latent_channels=``, ``block_out_channels=``...).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm_jax.autoencoders.base import (
  AUTOENCODERS,
  Autoencoder,
  GroupNorm,
  Layout,
  conv,
  load_into,
  random_weights,
  read_state_dict,
  torch_style_layout,
  upsample_nearest2x,
)


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """One KL autoencoder architecture and its latent scaling.

  Attributes:
    latent_channels: C of the latents [B, H/f, W/f, C], f = 2 ** (levels - 1).
    block_out_channels: width of each level, full resolution first.
    layers_per_block: ResNet blocks per encoder level (the decoder has one more).
    norm_groups: GroupNorm groups (32 in every preset).
    norm_eps: GroupNorm epsilon (1e-6).
    use_quant_conv: 1x1 conv on the encoder's moments (SD, SDXL).
    use_post_quant_conv: 1x1 conv on the decoder's input (SD, SDXL).
    mid_attention: the mid blocks' self-attention.
    scale, shift: model-space latents ``(mean - shift) * scale``.
  """

  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_groups: int = 32
  norm_eps: float = 1e-6
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_attention: bool = True
  scale: float = 1.0
  shift: float = 0.0


PRESETS = {
  "sd": KLConfig(latent_channels=4, scale=0.18215),
  "sdxl": KLConfig(latent_channels=4, scale=0.13025),
  "flux1": KLConfig(
    latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scale=0.3611, shift=0.1159
  ),
  "kl": KLConfig(),
}


class ResnetBlock(nnx.Module):
  """``x' + conv2(silu(norm2(conv1(silu(norm1(x))))))``, x' = x or its 1x1 shortcut.

  Args:
    n_in, n_out: channels in and out.
    cfg: norm groups and epsilon.
  """

  def __init__(self, n_in: int, n_out: int, cfg: KLConfig, *, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(cfg.norm_groups, n_in, cfg.norm_eps)
    self.conv1 = conv(n_in, n_out, rngs=rngs)
    self.norm2 = GroupNorm(cfg.norm_groups, n_out, cfg.norm_eps)
    self.conv2 = conv(n_out, n_out, rngs=rngs)
    self.conv_shortcut = conv(n_in, n_out, 1, pad=(0, 0), rngs=rngs) if n_in != n_out else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, n_in] -> [B, H, W, n_out]."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over all H * W positions, with GroupNorm and a residual."""

  def __init__(self, channels: int, cfg: KLConfig, *, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(cfg.norm_groups, channels, cfg.norm_eps)
    self.to_q = nnx.Linear(channels, channels, rngs=rngs)
    self.to_k = nnx.Linear(channels, channels, rngs=rngs)
    self.to_v = nnx.Linear(channels, channels, rngs=rngs)
    self.to_out = nnx.List([nnx.Linear(channels, channels, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c).astype(np.float32)
    out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v)
    return x + self.to_out[0](out).reshape(b, h, w, c)


class Downsample(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, stride=2, pad=(0, 1), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, C]."""
    return self.conv(x)


class Upsample(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C]."""
    return self.conv(upsample_nearest2x(x))


class Level(nnx.Module):
  """One resolution level: ResNet blocks, then an optional down- or upsampler."""

  def __init__(
    self,
    n_in: int,
    n_out: int,
    n_blocks: int,
    resample: str | None,
    cfg: KLConfig,
    *,
    rngs: nnx.Rngs,
  ):
    self.resnets = nnx.List(
      [ResnetBlock(n_in if i == 0 else n_out, n_out, cfg, rngs=rngs) for i in range(n_blocks)]
    )
    self.downsamplers = nnx.List([Downsample(n_out, rngs=rngs)]) if resample == "down" else None
    self.upsamplers = nnx.List([Upsample(n_out, rngs=rngs)]) if resample == "up" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.resnets:
      x = block(x)
    for sampler in self.downsamplers or ():
      x = sampler(x)
    for sampler in self.upsamplers or ():
      x = sampler(x)
    return x


class MidBlock(nnx.Module):
  def __init__(self, channels: int, cfg: KLConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, cfg, rngs=rngs)]) if cfg.mid_attention else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """Images [B, H, W, 3] in [-1, 1] -> moments [B, H/f, W/f, 2 * latent_channels]."""

  def __init__(self, cfg: KLConfig, *, rngs: nnx.Rngs):
    ch = cfg.block_out_channels
    self.conv_in = conv(3, ch[0], rngs=rngs)
    self.down_blocks = nnx.List(
      [
        Level(
          ch[max(i - 1, 0)],
          ch[i],
          cfg.layers_per_block,
          "down" if i < len(ch) - 1 else None,
          cfg,
          rngs=rngs,
        )
        for i in range(len(ch))
      ]
    )
    self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
    self.conv_norm_out = GroupNorm(cfg.norm_groups, ch[-1], cfg.norm_eps)
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for level in self.down_blocks:
      x = level(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents [B, h, w, latent_channels] (unscaled) -> images [B, f h, f w, 3], about [-1, 1]."""

  def __init__(self, cfg: KLConfig, *, rngs: nnx.Rngs):
    ch = tuple(reversed(cfg.block_out_channels))
    self.conv_in = conv(cfg.latent_channels, ch[0], rngs=rngs)
    self.mid_block = MidBlock(ch[0], cfg, rngs=rngs)
    self.up_blocks = nnx.List(
      [
        Level(
          ch[max(i - 1, 0)],
          ch[i],
          cfg.layers_per_block + 1,
          "up" if i < len(ch) - 1 else None,
          cfg,
          rngs=rngs,
        )
        for i in range(len(ch))
      ]
    )
    self.conv_norm_out = GroupNorm(cfg.norm_groups, ch[-1], cfg.norm_eps)
    self.conv_out = conv(ch[-1], 3, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for level in self.up_blocks:
      x = level(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class KLAutoencoder(Autoencoder):
  """A KL autoencoder (posterior mean at encoding) with [-1, 1] images.

  Args:
    cfg: architecture and latent scaling.
    name: the registered name.
    rngs: initialisation (random weights until loaded).
  """

  def __init__(self, cfg: KLConfig, name: str = "kl", *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.name = name
    self.latent_channels = cfg.latent_channels
    self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
    self.scale, self.shift = float(cfg.scale), float(cfg.shift)
    c = cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = conv(2 * c, 2 * c, 1, pad=(0, 0), rngs=rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(c, c, 1, pad=(0, 0), rngs=rngs) if cfg.use_post_quant_conv else None

  def moments(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> [B, H/f, W/f, 2C]: posterior mean, then log-variance."""
    h = self.encoder(images)
    return h if self.quant_conv is None else self.quant_conv(h)

  def encode_raw(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> posterior mean [B, H/f, W/f, C] (unscaled)."""
    return self.moments(images)[..., : self.latent_channels]

  def decode_raw(self, raw: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, C] -> images [B, f h, f w, 3] in [-1, 1] (unclipped)."""
    if self.post_quant_conv is not None:
      raw = self.post_quant_conv(raw)
    return self.decoder(raw)


# ----------------------------------------------------------------------------------------------
# Key layouts.

# Old diffusers attention names (before ``to_q``...).
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ORIGINAL_ATTENTION = {
  "group_norm": "norm",
  "to_q": "q",
  "to_k": "k",
  "to_v": "v",
  "to_out.0": "proj_out",
}


def original_key(key: str, levels: int) -> str:
  """A diffusers ``AutoencoderKL`` key -> its name in the original LDM / FLUX layout.

  Example: ``decoder.up_blocks.0.resnets.2.conv1.weight`` -> ``decoder.up.3.block.2.conv1.weight``
  with 4 levels (the original counts decoder levels from full resolution).
  """
  key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
  key = re.sub(
    r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key
  )
  key = re.sub(
    r"^decoder\.up_blocks\.(\d+)\.resnets\.",
    lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.",
    key,
  )
  key = re.sub(
    r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
    lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
    key,
  )
  key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
  m = re.match(r"^(.*)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key)
  if m:
    key = f"{m[1]}.mid.attn_1.{_ORIGINAL_ATTENTION[m[2]]}.{m[3]}"
  key = key.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
  return key


def detect_layout(keys) -> str:
  """``"diffusers"`` or ``"original"`` (LDM / FLUX) from the key names."""
  keys = list(keys)
  if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys):
    return "diffusers"
  if any(re.search(r"(^|\.)(encoder|decoder)\.(down|up|mid)\.", k) for k in keys):
    return "original"
  return "diffusers"


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The VAE's tensors of a file that may hold more (``first_stage_model.``, ``vae.``...)."""
  anchor = "encoder.conv_in.weight"
  prefixes = sorted(
    k[: -len(anchor)]
    for k in state_dict
    if k.endswith(anchor) and (k == anchor or k.endswith("." + anchor))
  )
  if not prefixes or prefixes[0] == "":
    return dict(state_dict)
  prefix = prefixes[0]
  return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _rename_old_attention(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state_dict.items():
    m = re.match(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", k)
    out[f"{m[1]}{_OLD_ATTENTION[m[2]]}.{m[3]}" if m else k] = v
  return out


def checkpoint_layout(model: KLAutoencoder, layout: str = "diffusers") -> Layout:
  """File key -> (our path, kind) in the ``"diffusers"`` or ``"original"`` key layout."""
  ours = torch_style_layout(model, drop=())
  if layout == "diffusers":
    return ours
  if layout != "original":
    raise ValueError(f"unknown KL key layout {layout!r}; choose diffusers, original or auto")
  levels = len(model.cfg.block_out_channels)
  return {original_key(k, levels): v for k, v in ours.items()}


def _weights_file(weights_path: str | os.PathLike) -> Path:
  path = Path(weights_path)
  if path.is_dir():
    for name in (
      "diffusion_pytorch_model.safetensors",
      "vae/diffusion_pytorch_model.safetensors",
      "ae.safetensors",
      "diffusion_pytorch_model.bin",
    ):
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(f"{path}: no diffusion_pytorch_model.safetensors or ae.safetensors")
  return path


def build_kl(
  name: str,
  weights_path: str | os.PathLike | None,
  *,
  layout: str = "auto",
  seed: int = 0,
  **overrides,
) -> KLAutoencoder:
  """A KL autoencoder: preset `name` with `overrides`, weights from `weights_path`.

  Args:
    name: ``sd``, ``sdxl``, ``flux1`` or ``kl`` (plain `KLConfig` defaults).
    weights_path: a ``.safetensors`` file (or PyTorch file, read without executing code), or
      a diffusers ``vae`` folder; None keeps random weights.
    layout: ``"auto"`` (from the key names), ``"diffusers"`` or ``"original"`` (LDM / FLUX).
    seed: initialisation seed when `weights_path` is None.
    **overrides: `KLConfig` fields, e.g. ``scale=``, ``shift=``, ``block_out_channels=``.

  Raises:
    ValueError: unknown options, or a file that does not fit the architecture (first
      mismatched tensor with both shapes, missing and unexpected keys).
  """
  fields = {f.name for f in dataclasses.fields(KLConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown {name} options {unknown}; choose from {sorted(fields)}")
  if "block_out_channels" in overrides:
    overrides["block_out_channels"] = tuple(int(c) for c in overrides["block_out_channels"])
  cfg = dataclasses.replace(PRESETS[name], **overrides)
  model = nnx.eval_shape(lambda: KLAutoencoder(cfg, name, rngs=nnx.Rngs(0)))
  if weights_path is None:
    return random_weights(model, seed)
  path = _weights_file(weights_path)
  state_dict = _rename_old_attention(_strip_prefix(read_state_dict(path)))
  if layout == "auto":
    layout = detect_layout(state_dict)
  return load_into(
    model,
    state_dict,
    checkpoint_layout(model, layout),
    what=f"{name} ({layout} layout, {cfg})",
    source=str(path),
    ignored=lambda k: k.startswith("loss."),
  )


def _register(name: str) -> None:
  AUTOENCODERS.register(name)(
    lambda weights_path, **options: build_kl(name, weights_path, **options)
  )


for _name in PRESETS:
  _register(_name)
