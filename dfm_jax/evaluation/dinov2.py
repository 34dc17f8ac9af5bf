"""DINOv2 ViT-S/14 and ViT-B/14 image encoders (Flax NNX) for FDD, the Frechet DINOv2 distance.

The network follows the official DINOv2 backbone (``facebookresearch/dinov2``, hub models
``dinov2_vits14`` / ``dinov2_vitb14``): a 14x14 patch-embedding conv, a CLS token, learned
position embeddings on a 37x37 grid (518 / 14) that are bicubically resampled to the input's
patch grid, pre-norm transformer blocks with LayerScale and a GELU MLP, and a final LayerNorm.
The FDD feature is the CLS token after the final norm ([N, 384] for S/14, [N, 768] for B/14).

Weights come from the official checkpoints ``dinov2_vits14_pretrain.pth`` /
``dinov2_vitb14_pretrain.pth`` (downloaded by the user; pass the path to `load_dinov2`); they
are read with the numpy-only `load_torch_file`, no torch needed.

FDD preprocessing (as in dgm-eval, Stein et al. 2023) in `preprocess_for_fdd`: uint8 RGB images
are resized to 224x224 with bicubic, antialiased resampling, rounded back to the uint8 grid (the
reference resizes PIL images), scaled to [0, 1] and normalised with the ImageNet mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). Grayscale inputs are repeated to RGB.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm_jax.evaluation.metrics import feature_statistics, frechet_distance
from dfm_jax.torch_pickle import load_torch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FDD_RESOLUTION = 224


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
  """Architecture of a DINOv2 ViT; `pos_grid` is the side of the learned position grid."""

  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int = 14
  mlp_ratio: int = 4
  pos_grid: int = 37
  layer_norm_eps: float = 1e-6
  # Added to the target grid size before deriving the bicubic scale factor, as upstream does.
  interpolate_offset: float = 0.1
  # A metric network: full float32 matmuls on every backend (TPU/GPU defaults are lower).
  precision: str = "highest"


CONFIGS = {
  "vits14": DinoV2Config(embed_dim=384, depth=12, num_heads=6),
  "vitb14": DinoV2Config(embed_dim=768, depth=12, num_heads=12),
  # FD-DINOv2 (dgm-eval, Stein et al. 2023) uses ViT-L/14.
  "vitl14": DinoV2Config(embed_dim=1024, depth=24, num_heads=16),
}


def _linear(cfg: DinoV2Config, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, precision=cfg.precision, rngs=rngs)


def _norm(cfg: DinoV2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: DINOv2's residual stream has large-magnitude channels where
  # E[x^2] - E[x]^2 loses float32 precision.
  return nnx.LayerNorm(
    cfg.embed_dim, epsilon=cfg.layer_norm_eps, use_fast_variance=False, rngs=rngs
  )


class LayerScale(nnx.Module):
  def __init__(self, dim: int):
    self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...]


class Attention(nnx.Module):
  def __init__(self, cfg: DinoV2Config, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.precision = cfg.precision
    self.qkv = _linear(cfg, cfg.embed_dim, 3 * cfg.embed_dim, rngs)
    self.proj = _linear(cfg, cfg.embed_dim, cfg.embed_dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]."""
    b, t, d = x.shape
    # The fused qkv output is laid out as (3, heads, head_dim) along its last axis.
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (d // self.num_heads) ** -0.5
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=self.precision)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v, precision=self.precision)
    return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
  def __init__(self, cfg: DinoV2Config, rngs: nnx.Rngs):
    self.fc1 = _linear(cfg, cfg.embed_dim, cfg.mlp_ratio * cfg.embed_dim, rngs)
    self.fc2 = _linear(cfg, cfg.mlp_ratio * cfg.embed_dim, cfg.embed_dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

  def __init__(self, cfg: DinoV2Config, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.ls1 = LayerScale(cfg.embed_dim)
    self.norm2 = _norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs)
    self.ls2 = LayerScale(cfg.embed_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """[out_size, in_size] matrix of PyTorch's bicubic resampling with a given `scale_factor`.

  Matches ``F.interpolate(mode="bicubic", align_corners=False, scale_factor=scale)``: the
  source coordinate of output i is ``(i + 0.5) / scale - 0.5`` (the given scale, not
  out/in), the cubic kernel has a = -0.75, and taps beyond the border reuse the edge sample.
  """
  a = -0.75
  src = (np.arange(out_size) + 0.5) / scale - 0.5
  idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - idx, 0.0, 1.0)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  mat = np.zeros((out_size, in_size))
  for j in range(4):
    np.add.at(mat, (np.arange(out_size), np.clip(idx + j - 1, 0, in_size - 1)), taps[:, j])
  return mat


class DinoV2(nnx.Module):
  """DINOv2 backbone; `__call__` maps normalised images [B, H, W, 3] to CLS features [B, D]."""

  def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d = cfg.patch_size, cfg.embed_dim
    self.patch_embed = nnx.Conv(
      3, d, (p, p), strides=(p, p), padding="VALID", precision=cfg.precision, rngs=rngs
    )
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
    self.pos_embed = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (1, 1 + cfg.pos_grid**2, d), jnp.float32)
    )
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
    self.norm = _norm(cfg, rngs)

  def position_embedding(self, grid_h: int, grid_w: int, square_input: bool) -> jax.Array:
    """[1, 1 + grid_h * grid_w, D]: the learned grid resampled to the input's patch grid."""
    g, d = self.cfg.pos_grid, self.cfg.embed_dim
    pos = self.pos_embed[...]
    # Upstream skips resampling only when the token count matches and H == W in pixels.
    if grid_h * grid_w == g * g and square_input:
      return pos
    off = self.cfg.interpolate_offset
    mh = jnp.asarray(bicubic_matrix(g, grid_h, (grid_h + off) / g), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(g, grid_w, (grid_w + off) / g), jnp.float32)
    grid = pos[0, 1:].reshape(g, g, d)
    grid = jnp.einsum("ai,bj,ijd->abd", mh, mw, grid, precision=self.cfg.precision)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, grid_h * grid_w, d)], axis=1)

  def forward_tokens(self, x: jax.Array) -> jax.Array:
    """Normalised images [B, H, W, 3] -> normed tokens [B, 1 + (H//14)(W//14), D], CLS first."""
    b, h, w, _ = x.shape
    patches = self.patch_embed(x)
    gh, gw, d = patches.shape[1:]
    tokens = jnp.concatenate(
      [jnp.broadcast_to(self.cls_token[...], (b, 1, d)), patches.reshape(b, gh * gw, d)], axis=1
    )
    tokens = tokens + self.position_embedding(gh, gw, h == w)
    for block in self.blocks:
      tokens = block(tokens)
    return self.norm(tokens)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalised images [B, H, W, 3] (H, W multiples of 14) -> CLS features [B, D]."""
    return self.forward_tokens(x)[:, 0]


def _resolve(config: DinoV2Config | str) -> DinoV2Config:
  if isinstance(config, str):
    if config not in CONFIGS:
      raise ValueError(f"unknown DINOv2 architecture {config!r}; choose from {list(CONFIGS)}")
    return CONFIGS[config]
  return config


def _checkpoint_layout(cfg: DinoV2Config) -> dict[str, tuple[tuple, str]]:
  """Official state-dict key -> (path in our parameter tree, layout conversion)."""
  layout = {
    "cls_token": (("cls_token",), "copy"),
    "pos_embed": (("pos_embed",), "copy"),
    "patch_embed.proj.weight": (("patch_embed", "kernel"), "conv"),
    "patch_embed.proj.bias": (("patch_embed", "bias"), "copy"),
    "norm.weight": (("norm", "scale"), "copy"),
    "norm.bias": (("norm", "bias"), "copy"),
  }
  for i in range(cfg.depth):
    pre = f"blocks.{i}."
    for norm in ("norm1", "norm2"):
      layout[f"{pre}{norm}.weight"] = (("blocks", i, norm, "scale"), "copy")
      layout[f"{pre}{norm}.bias"] = (("blocks", i, norm, "bias"), "copy")
    for ls in ("ls1", "ls2"):
      layout[f"{pre}{ls}.gamma"] = (("blocks", i, ls, "gamma"), "copy")
    for name, path in (
      ("attn.qkv", ("attn", "qkv")),
      ("attn.proj", ("attn", "proj")),
      ("mlp.fc1", ("mlp", "fc1")),
      ("mlp.fc2", ("mlp", "fc2")),
    ):
      layout[f"{pre}{name}.weight"] = (("blocks", i, *path, "kernel"), "linear")
      layout[f"{pre}{name}.bias"] = (("blocks", i, *path, "bias"), "copy")
  return layout


# Present in the official checkpoints but unused at inference (masked-image training only).
_IGNORED_KEYS = ("mask_token",)


def _to_ours(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":  # torch [out, in] -> [in, out]
    return array.T
  if kind == "conv":  # torch [out, in, kh, kw] -> [kh, kw, in, out]
    return array.transpose(2, 3, 1, 0)
  return array


def _torch_shape(shape: tuple, kind: str) -> tuple:
  if kind == "linear":
    return shape[::-1]
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _abstract_model(cfg: DinoV2Config) -> DinoV2:
  return nnx.eval_shape(lambda: DinoV2(cfg, rngs=nnx.Rngs(0)))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def expected_checkpoint_shapes(config: DinoV2Config | str) -> dict[str, tuple[int, ...]]:
  """Official state-dict key -> tensor shape (torch layout) that `config` needs."""
  cfg = _resolve(config)
  pure = nnx.to_pure_dict(nnx.state(_abstract_model(cfg)))
  return {
    key: _torch_shape(tuple(_get(pure, path).shape), kind)
    for key, (path, kind) in _checkpoint_layout(cfg).items()
  }


def dinov2_from_state_dict(
  state_dict: Mapping[str, np.ndarray], config: DinoV2Config | str
) -> DinoV2:
  """Build a `DinoV2` from an official state dict {name: array in torch layout}.

  Raises:
    KeyError: keys missing from, or unexpected in, the state dict (all of them listed).
    ValueError: a tensor whose shape does not fit `config`.
  """
  cfg = _resolve(config)
  graphdef, state = nnx.split(_abstract_model(cfg))
  pure = nnx.to_pure_dict(state)
  layout = _checkpoint_layout(cfg)
  missing = sorted(set(layout) - set(state_dict), key=_natural)
  unexpected = sorted(set(state_dict) - set(layout) - set(_IGNORED_KEYS), key=_natural)
  if missing or unexpected:
    raise KeyError(
      f"state dict does not match DINOv2 {cfg}: missing keys {_summary(missing)}; "
      f"unexpected keys {_summary(unexpected)}"
    )
  for key, (path, kind) in layout.items():
    value = np.asarray(state_dict[key])
    target = _get(pure, path)
    if _to_ours(value, kind).shape != target.shape:
      raise ValueError(
        f"{key}: checkpoint shape {value.shape}, expected "
        f"{_torch_shape(target.shape, kind)} for {cfg}"
      )
    parent = _get(pure, path[:-1])
    parent[path[-1]] = jnp.asarray(_to_ours(value, kind), jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _natural(key: str):
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _summary(keys: list[str], limit: int = 12) -> str:
  if not keys:
    return "none"
  more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def infer_architecture(state_dict: Mapping[str, np.ndarray]) -> str:
  """The name in `CONFIGS` whose width and depth match an official state dict."""
  width = int(np.asarray(state_dict["cls_token"]).shape[-1]) if "cls_token" in state_dict else 0
  depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
  for name, cfg in CONFIGS.items():
    if (cfg.embed_dim, cfg.depth) == (width, depth):
      return name
  raise ValueError(
    f"no DINOv2 architecture has width {width} and depth {depth}; supported: "
    + ", ".join(f"{n} ({c.embed_dim}x{c.depth})" for n, c in CONFIGS.items())
  )


def checkpoint_problem(path: str | os.PathLike) -> str | None:
  """Why ``path`` is not a loadable official DINOv2 checkpoint (unreadable, damaged, or of no
  supported size), or None; reads the file into host memory only, building no model."""
  try:
    infer_architecture(load_torch_file(path))
  except Exception as e:  # pylint: disable=broad-except  # any failure to read is the answer
    return f"{os.fspath(path)} is not a DINOv2 checkpoint this can load ({type(e).__name__}: {e})"
  return None


def load_dinov2(path: str | os.PathLike, config: DinoV2Config | str | None = None) -> DinoV2:
  """Load an official DINOv2 checkpoint file, e.g. ``dinov2_vitl14_pretrain.pth``.

  Example: ``load_dinov2("dinov2_vits14_pretrain.pth", "vits14")``. `config` is a name in
  `CONFIGS`, a `DinoV2Config`, or ``None`` to infer it from the file. Key and shape mismatches
  raise (see `dinov2_from_state_dict`).
  """
  state = load_torch_file(path)
  return dinov2_from_state_dict(state, config or infer_architecture(state))


def preprocess_for_fdd(images_uint8: jax.Array) -> jax.Array:
  """uint8 images [B, H, W, C in {1, 3}] -> normalised float32 [B, 224, 224, 3].

  Bicubic antialiased resize to 224x224, rounding to the uint8 grid, ImageNet normalisation.
  """
  x = images_uint8.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  size = (x.shape[0], FDD_RESOLUTION, FDD_RESOLUTION, 3)
  if x.shape != size:
    x = jnp.round(jnp.clip(jax.image.resize(x, size, "bicubic", antialias=True), 0, 255))
  x = x / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@functools.partial(jax.jit, static_argnums=0)
def _fdd_features(graphdef: nnx.GraphDef, state: nnx.State, images_uint8: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(preprocess_for_fdd(images_uint8))


def dinov2_features(model: DinoV2, images_uint8: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """CLS features [N, D] float32 of uint8 images [N, H, W, 3] (or [N, H, W, 1]).

  Images are preprocessed with `preprocess_for_fdd`; batches run through one jitted program
  (the last batch is zero-padded to `batch_size`).
  """
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
  graphdef, state = nnx.split(model)
  outs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    pad = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.uint8)
    feats = _fdd_features(graphdef, state, np.concatenate([chunk, pad]))
    outs.append(np.asarray(feats)[: len(chunk)])
  if not outs:
    return np.zeros((0, model.cfg.embed_dim), np.float32)
  return np.concatenate(outs)


def frechet_distance_of_features(fake: np.ndarray, real: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
  mu_f, sigma_f = feature_statistics(fake)
  mu_r, sigma_r = feature_statistics(real)
  return float(frechet_distance(mu_f, sigma_f, mu_r, sigma_r))


def dinov2_frechet_distance(
  model: DinoV2, fake_uint8: np.ndarray, real_uint8: np.ndarray, batch_size: int = 64
) -> float:
  """FDD: Frechet distance between Gaussians fitted to DINOv2 CLS features of two image sets."""
  return frechet_distance_of_features(
    dinov2_features(model, fake_uint8, batch_size), dinov2_features(model, real_uint8, batch_size)
  )
