"""Command-line entry point: flags -> config -> one function per mode. Kept short on purpose.

    python -m sharcs_jax.main --config=configs/qqp.py --workdir=/tmp/sharcs_qqp
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sharcs_jax import summary

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/qqp.py or "
                                "configs/qqp.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for reports (and, later, checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  result = summary.run(FLAGS.config, FLAGS.workdir)
  print(open(f"{FLAGS.workdir}/model_summary.md").read(), end="")
  logging.info("Done in %.1fs; reports in %s", result["seconds"], FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
