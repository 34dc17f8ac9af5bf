"""Autoencoders for latent-space training, chosen by name.

Common interface (`Autoencoder`, an `nnx.Module`)::

  ae = build("taef2", "../shared/weights/taef2")      # or build("flux1", "ae.safetensors")
  ae.name, ae.latent_channels, ae.downsample          # "taef2", 32, 8
  z = ae.encode(images)    # float32 [B, H, W, 3] in [-1, 1] -> [B, H/8, W/8, C]
  x = ae.decode(z)         # [B, h, w, C] -> float32 [B, 8h, 8w, 3], clipped to [-1, 1]

`encode` returns latents already in the model's space, ``(raw - shift) * scale``: the KL
posterior mean for the KL family, the raw latents for TAESD (scale 1, shift 0 unless given).
`decode` undoes the scaling first. Both are `nnx.jit`-compiled; inside your own jitted code use
the traceable `encode_traced` / `decode_traced` (e.g. over ``nnx.split(ae)``).

Registered names (`AUTOENCODERS.names()`):

* ``taesd``, ``taesdxl`` (4 latent channels), ``taesd3``, ``taef1`` (16), ``taef2`` (32,
  ``flux_2`` variant): `taesd.py`. `weights_path` is a folder with ``{name}_encoder.pth`` and
  ``{name}_decoder.pth`` (or ``.safetensors``), or the encoder file.
* ``sd`` (4 ch, scale 0.18215), ``sdxl`` (4 ch, 0.13025), ``flux1`` (16 ch, scale 0.3611,
  shift 0.1159, no quant convs), ``kl`` (architecture given as options): `kl.py`.
  `weights_path` is a ``.safetensors`` (or PyTorch) file in the diffusers key layout or the
  original LDM / FLUX ``ae.safetensors`` layout (detected from the keys).

Options of every builder: ``scale=``, ``shift=`` (override the latent scaling); the KL ones
also take architecture overrides (``block_out_channels=``, ``norm_groups=``, ...), see
`kl.build_kl`. ``weights_path=None`` keeps random weights (shape tests only).

Videos: `encode_clips(ae, clips)` (traceable; clips [B, T, H, W, 3] -> [B, T', h, w, C]) and
`decode_clips` are the one way to code clips. An autoencoder that codes clips itself (a video
autoencoder, e.g. one that also compresses time) defines ``encode_video_traced(clips [B, T, H,
W, 3]) -> [B, T', h, w, C]`` and ``decode_video_traced([B, T', h, w, C]) -> [B, T, H, W, 3]``
and these helpers use them; every other autoencoder codes the frames one by one (T' = T).
`decode_batched` decodes images and clips alike. No video autoencoder is registered yet.

Loading never executes code from the file; a file of another architecture raises one
ValueError naming the first mismatched tensor with both shapes and the missing / unexpected
keys.
"""

from __future__ import annotations

import os

from flax import nnx

from dfm_jax.autoencoders.base import AUTOENCODERS, Autoencoder
from dfm_jax.autoencoders.base import decode_clips, encode_clips, encodes_clips
from dfm_jax.autoencoders import kl as kl  # noqa: F401  (registers the KL family)
from dfm_jax.autoencoders import taesd as taesd  # noqa: F401  (registers the TAESD family)

__all__ = [
  "AUTOENCODERS",
  "Autoencoder",
  "build",
  "decode_batched",
  "decode_clips",
  "encode_clips",
  "encodes_clips",
  "from_config",
]


def build(kind: str, weights_path: str | os.PathLike | None, **options) -> Autoencoder:
  """The autoencoder registered as `kind` with the weights at `weights_path`.

  Args:
    kind: a registered name, e.g. ``"taef2"``, ``"sd"``, ``"sdxl"``, ``"flux1"``.
    weights_path: the family's weight file or folder (see the module docstring); None keeps
      random weights.
    **options: family options, e.g. ``scale=``, ``shift=``.

  Raises:
    ValueError: an unknown `kind` (listing the known names), or weights that do not fit.
  """
  return AUTOENCODERS.get(kind)(weights_path, **options)


def from_config(ae_config) -> Autoencoder:
  """The autoencoder of a config's ``autoencoder`` block (``kind``, ``weights``, ``scale``,
  ``shift``); ValueError / FileNotFoundError naming the field when it is incomplete."""
  kind = ae_config.get("kind", "")
  if not kind:
    raise ValueError(
      "autoencoder.kind is empty; name the autoencoder, e.g. "
      "--config.autoencoder.kind=taef2 --config.autoencoder.weights=DIR"
    )
  weights = ae_config.get("weights", "")
  if not weights:
    raise ValueError(f"autoencoder.weights is empty; give the {kind} weight file or folder")
  if not os.path.exists(weights):
    raise FileNotFoundError(f"autoencoder.weights: {weights!r} does not exist")
  options = {k: float(ae_config[k]) for k in ("scale", "shift") if ae_config.get(k) is not None}
  return build(kind, weights, **options)


_jit_decode_clips = nnx.jit(decode_clips)


def decode_batched(ae: Autoencoder, latents, batch_size: int = 32):
  """Model-space latents -> float32 numpy pixels in [-1, 1], decoded in batches of about
  ``batch_size`` images (the last batch padded, so one program serves all).

  Images ``[N, h, w, C]`` -> ``[N, H, W, 3]``; clips ``[N, T', h, w, C]`` -> ``[N, T, H, W,
  3]`` through `decode_clips`, ``max(1, batch_size // T')`` clips per call.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  latents = np.asarray(latents, np.float32)
  if latents.ndim == 5:  # clips
    decode = lambda z: _jit_decode_clips(ae, z)
    batch_size = max(1, batch_size // latents.shape[1])
  else:
    decode = ae.decode
  out = []
  for start in range(0, len(latents), batch_size):
    chunk = latents[start : start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    out.append(np.asarray(decode(chunk))[: batch_size - pad])
  return np.concatenate(out)
