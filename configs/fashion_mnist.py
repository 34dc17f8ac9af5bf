"""Fashion-MNIST 32x32 (28x28 padded), class-conditional, 2-stage DFM (16 -> 32), DiT-S width.

Needs Debian's `dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`).

  python -m dfm_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fmnist

Flow-matching twin (one stage, same backbone, tokens and sampling steps):

  python -m dfm_jax.main --config=configs/fashion_mnist.py:fm --workdir=workdirs/fmnist_fm
"""

from dfm_jax.config_defaults import base_config, flow_matching_twin

FASHION_MNIST_TRAIN = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def get_config(arg: str = "dfm"):
  c = base_config()
  c.total_steps = 20_000
  c.batch_size = 128
  c.log_every = 100
  c.checkpoint_every = 1000
  c.sample_every = 1000

  c.data.source = "idx"
  c.data.path = FASHION_MNIST_TRAIN
  c.data.resolution = 32
  c.data.channels = 1
  c.data.crop = "pad"
  c.data.random_flip = True
  c.data.num_classes = 10

  c.decomposition.kind = "laplacian"
  c.decomposition.num_stages = 2

  c.model.hidden_size = 256
  c.model.depth = 8
  c.model.num_heads = 4
  c.model.patch_size = 1  # 16x16 coarse stage -> 256 tokens; the 32x32 stage uses 2x2

  c.flow.stage_probs = (0.7, 0.3)

  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 500
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.999

  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)

  c.eval.num_samples = 5000
  c.eval.num_real = 10_000
  c.eval.classifier = "fashion_mnist"
  if arg == "fm":
    c = flow_matching_twin(c)
  elif arg != "dfm":
    raise ValueError(f"config argument must be 'dfm' or 'fm', got {arg!r}")
  return c
