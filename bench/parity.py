"""How closely every ported network matches its reference, and TAEF2's reconstruction quality.

  python bench/parity.py --out=docs/bench_parity.json

Each port runs on the fixture its test uses (tests/fixtures/, made by the ``make_*_fixture.py``
scripts there from the PyTorch references, float64 for the autoencoders) and the largest error
is reported the way that test measures it: absolute for the autoencoders (values are O(1)),
relative to the largest reference value for the feature networks. The tests' tolerances are
about 10x these figures; tests/test_published_numbers.py checks that they stay so, and that the
README quotes these figures. Then TAEF2 (the shipped weights) encodes and decodes real images:
Fashion-MNIST test images and MNIST-5k digits, bicubic 28 -> 64 px, grey -> RGB, PSNR in [0, 1]
pixel units. Needs the cached FID Inception weights (`python -m dfm_jax.evaluation.weights`) and
Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import importlib.util
import lzma
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import common
from dfm_jax.autoencoders import build, shipped_weights
from dfm_jax.data import load_mnist5k
from dfm_jax.data.arrays import load_idx
from dfm_jax.evaluation import dinov2, fid_features, i3d

FIXTURES = common.REPO / "tests" / "fixtures"
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
KL_TINY = dict(block_out_channels=(8, 16, 32, 32), norm_groups=4)  # as make_kl_fixture.py


def max_abs(actual, expected) -> float:
  return float(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)).max())


def max_rel(actual, expected) -> float:
  return max_abs(actual, expected) / float(np.abs(np.asarray(expected, np.float64)).max())


def autoencoder_errors() -> list[tuple[str, str, float]]:
  rows = []
  taef2 = build("taef2", shipped_weights("taef2"))
  ref = np.load(FIXTURES / "taef2_parity.npz")
  images = ref["images"].astype(np.float32) / 127.5 - 1
  rows.append(("TAEF2", "encode", max_abs(taef2.encode(images), ref["latents"])))
  decoded = np.clip(2 * ref["decoded"] - 1, -1, 1)
  rows.append(("TAEF2", "decode", max_abs(taef2.decode(ref["latents"]), decoded)))

  kl = dict(np.load(FIXTURES / "kl_parity.npz"))
  sd = build("sd", FIXTURES / "kl_sd_tiny_diffusers.safetensors", **KL_TINY)
  encode_raw = nnx.jit(lambda ae, x: ae.encode_raw(x))
  decode_raw = nnx.jit(lambda ae, z: ae.decode_raw(z))
  rows.append(("KL (SD)", "encode", max_abs(encode_raw(sd, kl["sd_images"]), kl["sd_mean"])))
  rows.append(("KL (SD)", "decode", max_abs(decode_raw(sd, kl["sd_latents"]), kl["sd_decoded"])))
  flux = build("flux1", FIXTURES / "kl_flux1_tiny_ae.safetensors", **KL_TINY)
  scaled = (kl["flux1_mean"] - flux.shift) * flux.scale
  rows.append(("KL (FLUX.1)", "encode", max_abs(flux.encode(kl["flux1_images"]), scaled)))
  decoded = decode_raw(flux, kl["flux1_latents"])
  rows.append(("KL (FLUX.1)", "decode", max_abs(decoded, kl["flux1_decoded"])))
  return rows


def inception_errors() -> list[tuple[str, str, float]]:
  data = dict(np.load(FIXTURES / "inception_parity.npz"))
  images = []
  for i in range(data["pool"].shape[0]):
    img, size = data[f"source_{i}"], data[f"size_{i}"]
    if tuple(size) != (0, 0):  # the fixture script's integer nearest enlargement
      img = img[np.arange(size[0]) * img.shape[0] // size[0]]
      img = img[:, np.arange(size[1]) * img.shape[1] // size[1]]
    images.append(img)
  pre = 0.0
  for i, img in enumerate(images):
    x = np.asarray(fid_features.preprocess(fid_features.to_rgb_uint8(img[None])))
    pre = max(pre, max_abs(x[0].reshape(-1)[data[f"pre_idx_{i}"]], data[f"pre_val_{i}"]))
  params = dict(fid_features.inception_params())
  params["fc"] = {"w": (data["fc_u"] @ data["fc_v"]).T, "b": data["fc_b"]}
  pool, logits = fid_features.extract_features(images, batch_size=4, params=params)
  return [
    ("FID Inception", "preprocessing (absolute)", pre),
    ("FID Inception", "pool3", max_rel(pool, data["pool"])),
    ("FID Inception", "logits", max_rel(logits, data["logits"])),
  ]


def dinov2_errors() -> list[tuple[str, str, float]]:
  spec = importlib.util.spec_from_file_location("fx", FIXTURES / "make_dinov2_fixture.py")
  fx = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fx)
  ref = dict(np.load(FIXTURES / "dinov2_tiny_reference.npz"))
  config = dinov2.DinoV2Config(
    embed_dim=int(ref["config_embed_dim"]),
    depth=int(ref["config_depth"]),
    num_heads=int(ref["config_num_heads"]),
  )
  model = dinov2.load_dinov2(FIXTURES / "dinov2_tiny.pth", config)
  err = 0.0
  for seed, (name, shape) in enumerate(fx.INPUTS.items()):
    cls = model(fx.normalise(fx.images(*shape, seed=seed)))
    err = max(err, max_rel(cls, ref[f"cls_{name}"]))
  tokens = model.forward_tokens(fx.normalise(fx.images(*fx.INPUTS["rect126x196"], seed=2)))
  return [
    ("DINOv2 (FDD)", "CLS features, every input size", err),
    ("DINOv2 (FDD)", "all tokens, 126x196", max_rel(tokens, ref["tokens_rect126x196"])),
  ]


def i3d_errors() -> list[tuple[str, str, float]]:
  ref = dict(np.load(FIXTURES / "i3d_reference.npz"))
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "i3d.pt"
    with lzma.open(FIXTURES / "i3d_random_weights.pt.xz") as f:
      path.write_bytes(f.read())
    model = i3d.load_i3d(path)
  ours = lambda x: np.asarray(x).transpose(0, 2, 3, 4, 1)  # noqa: E731  NCTHW -> NTHWC
  video = ref["pre_video"]
  pre = max(
    max_rel(i3d.preprocess(video, (16, 20)), ours(ref["pre_down"])),
    max_rel(i3d.preprocess(video[:, :, :8, :10], (30, 28)), ours(ref["pre_up"])),
  )
  graphdef, state = nnx.split(model)
  pre_pool = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, output="pre_pool"))
  full = ref["full_video"]
  return [
    ("I3D (FVD)", "preprocessing", pre),
    (
      "I3D (FVD)",
      "pre-pool features",
      max_rel(pre_pool(state, ours(ref["small_input"])), ours(ref["small_prepool"])),
    ),
    (
      "I3D (FVD)",
      "logits",
      max_rel(i3d.i3d_features(model, full, batch_size=2), ref["full_logits"]),
    ),
    (
      "I3D (FVD)",
      "pool",
      max_rel(i3d.i3d_features(model, full, batch_size=2, output="pool"), ref["full_pool"]),
    ),
  ]


def taef2_psnr(gray_uint8: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB, [0, 1] pixel units) of TAEF2's round trip of [N, 28, 28] grey images."""
  taef2 = build("taef2", shipped_weights("taef2"))
  gray = jnp.asarray(gray_uint8[..., None], jnp.float32) / 127.5 - 1
  x = jax.image.resize(gray, (len(gray), 64, 64, 1), "bicubic")
  x = jnp.clip(jnp.repeat(x, 3, -1), -1, 1)
  out = []
  for i in range(0, len(x), 64):
    y = taef2.decode(taef2.encode(x[i : i + 64]))
    out.append(np.asarray(jnp.mean(((x[i : i + 64] - y) / 2) ** 2, axis=(1, 2, 3))))
  return 10 * np.log10(1 / np.concatenate(out))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=1024, help="images per PSNR set")
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)
  report.say(common.machine_summary())

  rows = autoencoder_errors() + inception_errors() + dinov2_errors() + i3d_errors()
  report.table(
    "Largest error against the reference, float32 here (autoencoders: absolute; feature "
    "networks: relative to the largest reference value)",
    ["network", "output", "max error"],
    [[net, out, f"{err:.1e}"] for net, out, err in rows],
  )
  sets = {
    "Fashion-MNIST test": load_idx(str(FASHION_TEST))[: args.num],
    "MNIST-5k": load_mnist5k()[0][: args.num, ..., 0],
  }
  psnr = {name: taef2_psnr(images) for name, images in sets.items()}
  report.table(
    f"TAEF2 round trip, {args.num} images per set, bicubic 28 -> 64 px, grey -> RGB",
    ["images", "mean PSNR (dB)", "5th percentile (dB)"],
    [[name, f"{p.mean():.1f}", f"{np.percentile(p, 5):.1f}"] for name, p in psnr.items()],
  )
  worst = max(rows, key=lambda r: r[2])
  report.finish(
    f"TAEF2 round trip of Fashion-MNIST: {psnr['Fashion-MNIST test'].mean():.1f} dB mean PSNR; "
    f"largest port error {worst[2]:.1e} ({worst[0]} {worst[1]})"
  )


if __name__ == "__main__":
  main()
