"""Command line: ``python -m dfm_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]``.

Modes: ``train`` (default; re-running resumes from the latest checkpoint), ``sample`` (images
from the EMA weights of a checkpoint) and ``eval`` (FID / KID / IS of samples). Override any
config field with ``--config.FIELD=VALUE``.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from dfm_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  train.maybe_initialize_distributed(config)
  if FLAGS.mode == "train":
    train.train(config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    from dfm_jax import inference  # pylint: disable=g-import-not-at-top
    inference.sample_mode(config, FLAGS.workdir)
  else:
    from dfm_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.eval_mode(config, FLAGS.workdir)


class _QuietLibraries(std_logging.Filter):
  """Keeps the checkpoint and input libraries' per-operation INFO lines out of the log."""

  def filter(self, record):
    noisy = any(name in record.pathname for name in ("orbax", "grain", "tensorstore"))
    return record.levelno >= std_logging.WARNING or not noisy


def run():
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main)


if __name__ == "__main__":
  run()
