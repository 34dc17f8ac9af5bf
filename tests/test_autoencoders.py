"""Autoencoders: parity with the PyTorch references, loading errors, shapes, TAEF2 quality.

Fixtures (see their scripts in tests/fixtures/): taef2_parity.npz from the reference
``taesd.py`` on the real TAEF2 weights; kl_parity.npz with two reduced-width diffusers
``AutoencoderKL``s (SD structure in the diffusers key layout, FLUX.1 structure in the original
``ae.safetensors`` layout). The references ran in float64; ours is float32 (fp16 weights).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax.autoencoders import AUTOENCODERS, build, kl, shipped_weights

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TAEF2_DIR = Path(shipped_weights("taef2"))  # inside the package, checksummed
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
KL_TINY = dict(block_out_channels=(8, 16, 32, 32), norm_groups=4)  # as make_kl_fixture.py
KL_FILES = {
  "sd": "kl_sd_tiny_diffusers.safetensors",
  "sdxl": "kl_sd_tiny_diffusers.safetensors",
  "flux1": "kl_flux1_tiny_ae.safetensors",
}
# Max abs error allowed against the float64 references (values are O(1)), about 10x the error
# bench/parity.py measures on a CPU (docs/bench_parity.json): TAEF2 4.4e-6 (encode) and 2.5e-6
# (decode), the KL family 7.2e-6.
TAEF2_ATOL = 5e-5
ATOL = 7e-5


@pytest.fixture(scope="module")
def taef2():
  return build("taef2", TAEF2_DIR)


@pytest.fixture(scope="module")
def kl_ref():
  return dict(np.load(FIXTURES / "kl_parity.npz"))


def test_registry_lists_both_families_and_rejects_unknown_names():
  assert {"taef2", "taesd", "taesdxl", "sd", "sdxl", "flux1", "kl"} <= set(AUTOENCODERS.names())
  with pytest.raises(ValueError, match=r"unknown autoencoder 'taef3' \(did you mean 'taef2'\?\)"):
    build("taef3", None)
  with pytest.raises(ValueError, match="unknown sd options"):
    build("sd", None, block_out_channel=(8, 16))


def test_taef2_matches_reference_on_real_weights(taef2):
  ref = np.load(FIXTURES / "taef2_parity.npz")
  images = ref["images"].astype(np.float32) / 127.5 - 1
  assert (taef2.name, taef2.latent_channels, taef2.downsample) == ("taef2", 32, 8)
  latents = taef2.encode(images)
  assert latents.shape == (2, 8, 8, 32) and latents.dtype == jnp.float32
  np.testing.assert_allclose(latents, ref["latents"], rtol=0, atol=TAEF2_ATOL)
  np.testing.assert_allclose(
    taef2.decode(ref["latents"]), np.clip(2 * ref["decoded"] - 1, -1, 1), rtol=0, atol=TAEF2_ATOL
  )


def test_taef2_reconstructs_real_images(taef2):
  """16 Fashion-MNIST test images, bicubic 28 -> 64, grey -> RGB: measured 29.5 dB mean PSNR
  (1,024 images: 29.5 dB mean, 27.1 dB 5th percentile; MNIST-5k: 30.9 dB)."""
  from dfm_jax.data.arrays import load_idx  # pylint: disable=g-import-not-at-top

  gray = jnp.asarray(load_idx(str(FASHION))[:16, :, :, None], jnp.float32) / 127.5 - 1
  x = jnp.clip(jnp.repeat(jax.image.resize(gray, (16, 64, 64, 1), "bicubic"), 3, -1), -1, 1)
  # Batches of 2 at 64x64, the parity test's shapes: no new compilation.
  y = jnp.concatenate([taef2.decode(taef2.encode(x[i : i + 2])) for i in range(0, 16, 2)])
  mse = jnp.mean(((x - y) / 2) ** 2, axis=(1, 2, 3))  # in [0, 1] pixel units
  psnr = 10 * np.log10(1 / np.asarray(mse))
  assert psnr.mean() > 27.0, psnr
  assert psnr.min() > 22.0, psnr


def test_taesd_file_of_another_architecture_gives_one_clear_error():
  with pytest.raises(ValueError) as err:
    build("taesd", TAEF2_DIR / "taef2_encoder.pth")
  msg = str(err.value)
  assert "taef2_encoder.pth" in msg
  assert "tensor '14.bias' has shape (32,) in the file, expected (4,)" in msg
  assert "unexpected keys [11.pool.0.weight" in msg


@nnx.jit
def _raw_networks(ae, images, latents):
  return ae.encode_raw(images), ae.decode_raw(latents)


@pytest.fixture(scope="module")
def flux1_tiny():
  return build("flux1", FIXTURES / KL_FILES["flux1"], **KL_TINY)


def test_kl_sd_matches_diffusers(kl_ref):
  """Raw networks (posterior mean after quant_conv; unclipped decoder) against diffusers."""
  ae = build("sd", FIXTURES / KL_FILES["sd"], **KL_TINY)
  assert ae.quant_conv is not None and ae.post_quant_conv is not None
  mean, decoded = _raw_networks(ae, kl_ref["sd_images"], kl_ref["sd_latents"])
  np.testing.assert_allclose(mean, kl_ref["sd_mean"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(decoded, kl_ref["sd_decoded"], rtol=0, atol=ATOL)


def test_kl_flux1_matches_diffusers(flux1_tiny, kl_ref):
  """FLUX.1 structure from an ``ae.safetensors``-layout file: public API (scale and shift)."""
  ae = flux1_tiny
  assert ae.quant_conv is None and ae.post_quant_conv is None
  assert (ae.scale, ae.shift, ae.downsample, ae.latent_channels) == (0.3611, 0.1159, 8, 16)
  np.testing.assert_allclose(
    ae.encode(kl_ref["flux1_images"]), (kl_ref["flux1_mean"] - 0.1159) * 0.3611, rtol=0, atol=ATOL
  )
  np.testing.assert_allclose(
    ae.decode((kl_ref["flux1_latents"] - 0.1159) * 0.3611),
    np.clip(kl_ref["flux1_decoded"], -1, 1),
    rtol=0,
    atol=ATOL,
  )
  # Pure function of the split state inside the caller's jax.jit: the unclipped decoder.
  graphdef, state = nnx.split(ae)
  decode_raw = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode_raw(z))
  np.testing.assert_allclose(
    decode_raw(state, kl_ref["flux1_latents"]), kl_ref["flux1_decoded"], rtol=0, atol=ATOL
  )


def test_kl_presets_and_key_layouts():
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  sd = build("sd", FIXTURES / KL_FILES["sd"], **KL_TINY)
  sdxl = build("sdxl", FIXTURES / KL_FILES["sd"], **KL_TINY)  # same architecture as SD
  assert (sd.scale, sd.shift, sd.latent_channels) == (0.18215, 0.0, 4)
  assert (sdxl.scale, sdxl.shift, sdxl.latent_channels) == (0.13025, 0.0, 4)
  np.testing.assert_array_equal(sdxl.quant_conv.kernel[...], sd.quant_conv.kernel[...])
  assert kl.PRESETS["flux1"].block_out_channels == (128, 256, 512, 512)
  flux_keys = load_file(str(FIXTURES / KL_FILES["flux1"]))
  assert kl.detect_layout(flux_keys) == "original"
  assert kl.detect_layout(load_file(str(FIXTURES / KL_FILES["sd"]))) == "diffusers"
  assert flux_keys["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
  assert (
    kl.original_key("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", 4)
    == "decoder.up.3.block.2.nin_shortcut.weight"
  )
  assert (
    kl.original_key("encoder.mid_block.attentions.0.to_out.0.bias", 4)
    == "encoder.mid.attn_1.proj_out.bias"
  )
  # Forcing the wrong layout names the missing keys.
  with pytest.raises(ValueError, match=r"missing keys \[decoder.conv_norm_out.bias"):
    build("flux1", FIXTURES / KL_FILES["flux1"], layout="diffusers", **KL_TINY)
  ae = build("flux1", FIXTURES / KL_FILES["flux1"], scale=1.0, shift=0.0, **KL_TINY)
  assert (ae.scale, ae.shift) == (1.0, 0.0)


def test_kl_file_of_another_architecture_gives_one_clear_error():
  with pytest.raises(ValueError) as err:  # an SD file read as FLUX.1 (16 latent channels)
    build("flux1", FIXTURES / KL_FILES["sd"], **KL_TINY)
  msg = str(err.value)
  assert "kl_sd_tiny_diffusers.safetensors" in msg
  assert (
    "tensor 'decoder.conv_in.weight' has shape (32, 4, 3, 3) in the file, "
    "expected (32, 16, 3, 3)" in msg
  )
  assert "unexpected keys [post_quant_conv.bias, post_quant_conv.weight, quant_conv.bias" in msg
  with pytest.raises(
    ValueError,
    match=r"tensor 'decoder.conv_in.bias' has shape \(32,\) in "
    r"the file, expected \(512,\)",
  ):
    build("sd", FIXTURES / KL_FILES["sd"])  # full-width preset, tiny file


def test_round_trip_shapes_and_input_checks(flux1_tiny):
  ae = flux1_tiny  # the parity test's shapes: no new compilation
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)), jnp.float32)
  z = ae.encode(x)
  assert z.shape == (2, 4, 6, 16) and z.dtype == jnp.float32
  y = ae.decode(z)
  assert y.shape == (2, 32, 48, 3) and y.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y))) <= 1.0
  with pytest.raises(ValueError, match="multiples of 8"):
    ae.encode(x[:, :12])
  with pytest.raises(ValueError, match=r"latents \[B, h, w, 16\]"):
    ae.decode(z[..., :1])
  # Random weights (weights_path=None) of every family build without a file.
  for kind, channels in (("sd", 4), ("taef2", 32)):
    model = build(kind, None, **(KL_TINY if kind == "sd" else {}))
    assert model.latent_channels == channels and model.downsample == 8


def test_kl_vae_inside_a_bigger_checkpoint_with_old_attention_names(tmp_path):
  """LDM single files prefix the VAE (``first_stage_model.``); old diffusers files name the
  attention ``query`` / ``key`` / ``value`` / ``proj_attn``."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for k, v in load_file(str(FIXTURES / KL_FILES["sd"])).items():
    for new_name, old_name in old.items():
      k = k.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
    state["first_stage_model." + k] = v
  state["model.diffusion_model.out.weight"] = np.zeros(3, np.float32)  # not the VAE's
  save_file(state, str(tmp_path / "model.safetensors"))
  ours = build("sd", tmp_path / "model.safetensors", **KL_TINY)
  ref = build("sd", FIXTURES / KL_FILES["sd"], **KL_TINY)
  for a, b in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(ref))):
    np.testing.assert_array_equal(a, b)
