"""Autoencoders for latent-space training, chosen by name.

Common interface (`Autoencoder`, an `nnx.Module`)::

  ae = build("taef2", shipped_weights("taef2"))      # or build("flux1", "ae.safetensors")
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

Shipped weights: TAEF2's (MIT, 5.4 MB) are inside the package, `shipped_weights("taef2")`, so
a fresh install works offline; a config's empty ``autoencoder.weights`` means them. Other
networks' weights come from the user's path.

Loading never executes code from the file; a file of another architecture raises one
ValueError naming the first mismatched tensor with both shapes and the missing / unexpected
keys.
"""

from __future__ import annotations

import hashlib
import logging
import os

from flax import nnx

from dfm_jax import storage
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
  "shipped_weights",
]

# Weight files inside the package: kind -> {file name: sha256}, checked on every use.
SHIPPED = {
  "taef2": {
    "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
  },
}


def shipped_weights(kind: str) -> str:
  """The folder of the weights shipped for ``kind`` (see `SHIPPED`), after checking every
  file's sha256; ValueError when none are shipped for it, or a file is missing or damaged."""
  if kind not in SHIPPED:
    raise ValueError(
      f"no weights ship with the package for autoencoder {kind!r} (only for "
      f"{', '.join(sorted(SHIPPED))}): set autoencoder.weights to its file or folder"
    )
  folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", kind)
  for name, want in SHIPPED[kind].items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise ValueError(f"the shipped {kind} weight file {path} is missing: reinstall dfm_jax")
    with open(path, "rb") as f:
      got = hashlib.sha256(f.read()).hexdigest()
    if got != want:
      raise ValueError(
        f"the shipped {kind} weight file {path} is damaged (sha256 {got[:12]}..., expected "
        f"{want[:12]}...): reinstall dfm_jax"
      )
  return folder


# ``autoencoder.weights`` value for a smoke test without the real weights (the runlocal variant
# of a config whose weights are not on this machine): see `stand_in`.
STAND_IN = "stand-in"


def stand_in(kind: str) -> Autoencoder:
  """A small randomly initialised KL autoencoder with ``kind``'s latent channels and
  downsampling (and latent scaling): the shapes and code paths of ``kind`` at a fraction of its
  cost, for smoke tests. Its decoded samples are not images."""
  real = nnx.eval_shape(lambda: build(kind, None))
  levels = int(real.downsample).bit_length()  # downsample 2 ** (levels - 1)
  return kl.build_kl(
    "kl",
    None,
    latent_channels=int(real.latent_channels),
    block_out_channels=(16,) * levels,
    layers_per_block=1,
    norm_groups=8,
    mid_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
  )


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
  ``shift``); ValueError / FileNotFoundError naming the field when it is incomplete.

  ``weights``: a local file or folder, ``gs://...``, ``hf://OWNER/REPO@REVISION/PATH`` (see
  `storage.local_copy`), empty for the weights shipped with the package, or `STAND_IN`."""
  kind = ae_config.get("kind", "")
  if not kind:
    raise ValueError(
      "autoencoder.kind is empty; name the autoencoder, e.g. "
      "--config.autoencoder.kind=taef2 --config.autoencoder.weights=DIR"
    )
  weights = ae_config.get("weights", "")
  if weights == STAND_IN:
    logging.warning(
      "autoencoder.weights=%r: a small random autoencoder with %s's latent shape stands in "
      "(a smoke test: decoded samples are not images)",
      STAND_IN,
      kind,
    )
    return stand_in(kind)
  if not weights and kind not in SHIPPED:
    raise ValueError(f"autoencoder.weights is empty; give the {kind} weight file or folder")
  weights = storage.local_copy(weights, "autoencoder.weights") or shipped_weights(kind)
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
