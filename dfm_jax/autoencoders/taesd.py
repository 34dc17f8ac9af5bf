"""TAESD-family tiny autoencoders (madebyollin/taesd, MIT) ported to Flax NNX.

Architecture as the reference ``taesd.py`` (``Encoder`` / ``Decoder`` ``nn.Sequential``s of 3x3
convs, ReLU and residual ``Block``s with 64 channels; 8x down/up-sampling by stride-2 convs and
nearest 2x upsampling; the decoder starts with the soft clamp ``tanh(z / 3) * 3``). The
``flux_2`` variant (TAEF2) adds, in the three low-resolution blocks of each network, a global
branch ``x + conv1x1(relu(GroupNorm(4)(conv1x1(x))))`` with 4x the channels.

The reference works on images in [0, 1]; our interface is [-1, 1] and is converted inside.
Raw latents are used as they are (scale 1, shift 0) unless `scale` / `shift` are given.

Presets (registered names): ``taesd`` / ``taesdxl`` (4 channels), ``taesd3`` / ``taef1``
(16), ``taef2`` (32, ``flux_2`` variant). Only TAEF2's weights are checked in tests here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dfm_jax.autoencoders.base import (
  AUTOENCODERS,
  Autoencoder,
  GroupNorm,
  conv,
  load_into,
  random_weights,
  read_state_dict,
  torch_style_layout,
  upsample_nearest2x,
)

WIDTH = 64


@dataclasses.dataclass(frozen=True)
class TAESDConfig:
  """One TAESD-family architecture.

  Attributes:
    latent_channels: C of the latents [B, H/8, W/8, C].
    use_midblock_gn: the ``flux_2`` variant's GroupNorm branch in the low-resolution blocks.
    scale, shift: default model-space latents ``(raw - shift) * scale``.
  """

  latent_channels: int = 4
  use_midblock_gn: bool = False
  scale: float = 1.0
  shift: float = 0.0


PRESETS = {
  "taesd": TAESDConfig(4),
  "taesdxl": TAESDConfig(4),
  "taesd3": TAESDConfig(16),
  "taef1": TAESDConfig(16),
  "taef2": TAESDConfig(32, use_midblock_gn=True),
}


class ReLU(nnx.Module):
  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


class Clamp(nnx.Module):
  """Soft clamp of the raw latents to (-3, 3)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(x / 3) * 3


class Upsample(nnx.Module):
  def __call__(self, x: jax.Array) -> jax.Array:
    return upsample_nearest2x(x)


class Block(nnx.Module):
  """The reference ``Block``: ``relu(convs(x') + skip(x'))`` with ``x' = x + pool(x)``.

  Args:
    n_in, n_out: channels in and out.
    use_midblock_gn: add the ``pool`` branch (1x1 conv to 4 * n_in, GroupNorm(4), ReLU,
      1x1 conv back), as in TAEF2's low-resolution blocks.
  """

  def __init__(self, n_in: int, n_out: int, use_midblock_gn: bool = False, *, rngs: nnx.Rngs):
    self.conv = nnx.List(
      [
        conv(n_in, n_out, rngs=rngs),
        ReLU(),
        conv(n_out, n_out, rngs=rngs),
        ReLU(),
        conv(n_out, n_out, rngs=rngs),
      ]
    )
    self.skip = conv(n_in, n_out, 1, pad=(0, 0), bias=False, rngs=rngs) if n_in != n_out else None
    n_gn = 4 * n_in
    self.pool = (
      nnx.List(
        [
          conv(n_in, n_gn, 1, pad=(0, 0), bias=False, rngs=rngs),
          GroupNorm(4, n_gn),
          ReLU(),
          conv(n_gn, n_in, 1, pad=(0, 0), bias=False, rngs=rngs),
        ]
      )
      if use_midblock_gn
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, n_in] -> [B, H, W, n_out]."""
    if self.pool is not None:
      x = x + _sequential(self.pool, x)
    skip = x if self.skip is None else self.skip(x)
    return jax.nn.relu(_sequential(self.conv, x) + skip)


def _sequential(layers, x: jax.Array) -> jax.Array:
  for layer in layers:
    x = layer(x)
  return x


class Encoder(nnx.Module):
  """The reference ``Encoder`` (``layers[i]`` is its ``nn.Sequential`` item ``i``).

  Maps [B, H, W, 3] images in [0, 1] to raw latents [B, H/8, W/8, latent_channels].
  """

  def __init__(self, cfg: TAESDConfig, *, rngs: nnx.Rngs):
    w = WIDTH

    def blocks(n, gn=False):
      return [Block(w, w, gn, rngs=rngs) for _ in range(n)]

    def down():
      return conv(w, w, stride=2, bias=False, rngs=rngs)

    self.layers = nnx.List(
      [
        conv(3, w, rngs=rngs),
        *blocks(1),
        down(),
        *blocks(3),
        down(),
        *blocks(3),
        down(),
        *blocks(3, cfg.use_midblock_gn),
        conv(w, cfg.latent_channels, rngs=rngs),
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return _sequential(self.layers, x)


class Decoder(nnx.Module):
  """The reference ``Decoder`` (``layers[i]`` is its ``nn.Sequential`` item ``i``).

  Maps raw latents [B, h, w, latent_channels] to images [B, 8h, 8w, 3] in about [0, 1].
  """

  def __init__(self, cfg: TAESDConfig, *, rngs: nnx.Rngs):
    w = WIDTH

    def blocks(n, gn=False):
      return [Block(w, w, gn, rngs=rngs) for _ in range(n)]

    def up():
      return [Upsample(), conv(w, w, bias=False, rngs=rngs)]

    self.layers = nnx.List(
      [
        Clamp(),
        conv(cfg.latent_channels, w, rngs=rngs),
        ReLU(),
        *blocks(3, cfg.use_midblock_gn),
        *up(),
        *blocks(3),
        *up(),
        *blocks(3),
        *up(),
        *blocks(1),
        conv(w, 3, rngs=rngs),
      ]
    )

  def __call__(self, z: jax.Array) -> jax.Array:
    return _sequential(self.layers, z)


class TAESD(Autoencoder):
  """A TAESD-family autoencoder: `encoder` / `decoder` as in the reference, [-1, 1] images.

  Args:
    cfg: the architecture and default scale / shift.
    name: the registered name.
    rngs: initialisation (random weights until loaded).
  """

  def __init__(self, cfg: TAESDConfig, name: str = "taesd", *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.name = name
    self.latent_channels = cfg.latent_channels
    self.downsample = 8
    self.scale, self.shift = float(cfg.scale), float(cfg.shift)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  def encode_raw(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> raw latents [B, H/8, W/8, C]."""
    return self.encoder((images + 1.0) * 0.5)

  def decode_raw(self, raw: jax.Array) -> jax.Array:
    """Raw latents [B, h, w, C] -> images [B, 8h, 8w, 3] in [-1, 1] (unclipped)."""
    return self.decoder(raw) * 2.0 - 1.0


def _weight_files(
  name: str, weights_path: str | os.PathLike, decoder_path=None
) -> tuple[Path, Path]:
  """(encoder file, decoder file) from a folder, or from the encoder file's name."""
  path = Path(weights_path)
  if path.is_dir():
    for ext in (".pth", ".safetensors", ".pt"):
      enc, dec = path / f"{name}_encoder{ext}", path / f"{name}_decoder{ext}"
      if enc.is_file():
        return enc, Path(decoder_path) if decoder_path else dec
    raise FileNotFoundError(f"{path}: no {name}_encoder.pth / .safetensors in this folder")
  if decoder_path:
    return path, Path(decoder_path)
  if "encoder" not in path.name:
    raise ValueError(
      f"{path}: give the folder holding {name}_encoder/_decoder files, or the "
      "encoder file (its name containing 'encoder') with decoder_path"
    )
  return path, path.with_name(path.name.replace("encoder", "decoder"))


def build_taesd(
  name: str,
  weights_path: str | os.PathLike | None,
  *,
  decoder_path: str | os.PathLike | None = None,
  scale: float | None = None,
  shift: float | None = None,
  latent_channels: int | None = None,
  use_midblock_gn: bool | None = None,
  seed: int = 0,
) -> TAESD:
  """A TAESD-family autoencoder with the weights of `weights_path`.

  Args:
    name: preset, one of `PRESETS`.
    weights_path: a folder holding ``{name}_encoder.pth`` and ``{name}_decoder.pth`` (or
      ``.safetensors``), or the encoder file (the decoder file name has ``decoder`` in place
      of ``encoder``); None keeps random weights (for shape tests).
    decoder_path: the decoder file, when it is not found from `weights_path`.
    scale, shift: model-space latents ``(raw - shift) * scale`` (default 1 and 0).
    latent_channels, use_midblock_gn: architecture overrides.
    seed: initialisation seed when `weights_path` is None.

  Raises:
    ValueError: a file that does not fit the architecture (first mismatched tensor with
      both shapes, missing and unexpected keys).
  """
  cfg = PRESETS[name]
  overrides = {
    k: v
    for k, v in dict(
      scale=scale, shift=shift, latent_channels=latent_channels, use_midblock_gn=use_midblock_gn
    ).items()
    if v is not None
  }
  cfg = dataclasses.replace(cfg, **overrides)
  model = nnx.eval_shape(lambda: TAESD(cfg, name, rngs=nnx.Rngs(0)))
  if weights_path is None:
    return random_weights(model, seed)
  enc_path, dec_path = _weight_files(name, weights_path, decoder_path)
  what = f"{name} ({cfg})"
  enc_layout = {
    k: (("encoder", *p), kind) for k, (p, kind) in torch_style_layout(model.encoder).items()
  }
  dec_layout = {
    k: (("decoder", *p), kind) for k, (p, kind) in torch_style_layout(model.decoder).items()
  }
  # Each file is checked on its own, so the message names the file at fault.
  enc = read_state_dict(enc_path)
  dec = read_state_dict(dec_path)
  model = load_into(model, enc, enc_layout, what=f"the {what} encoder", source=str(enc_path))
  return load_into(model, dec, dec_layout, what=f"the {what} decoder", source=str(dec_path))


def _register(name: str) -> None:
  AUTOENCODERS.register(name)(
    lambda weights_path, **options: build_taesd(name, weights_path, **options)
  )


for _name in PRESETS:
  _register(_name)
