"""Command-line entry point: flags -> config -> one function per mode. Kept short on purpose.

    python -m sharcs_jax.main --config=configs/qqp.py --workdir=/tmp/sharcs_qqp
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sharcs_jax import summary, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/qqp.py or "
                                "configs/qqp.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and reports; re-running the "
                    "same command resumes from its latest checkpoint.")
flags.DEFINE_enum("mode", "train", ["train", "summary"],
                  "train: train SHARCS and report on dev; summary: FLOPs per width only.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  if FLAGS.mode == "summary":
    summary.run(FLAGS.config, FLAGS.workdir)
    print(open(f"{FLAGS.workdir}/model_summary.md").read(), end="")
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(open(f"{FLAGS.workdir}/report.md").read(), end="")
  logging.info("Reports in %s", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
