"""Command-line entry point: flags -> config -> one function per mode. Kept short on purpose.

    python -m sharcs_jax.main --config=configs/qqp.py --workdir=/tmp/sharcs_qqp
    python -m sharcs_jax.main --mode=predict --workdir=/tmp/sharcs_qqp \
        --input=dev.tsv --output=/tmp/predictions.jsonl
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sharcs_jax import predict, summary, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/qqp.py or "
                                "configs/qqp.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and reports; re-running the "
                    "same command resumes from its latest checkpoint.")
flags.DEFINE_enum("mode", "train", ["train", "summary", "predict"],
                  "train: train SHARCS and report on dev; summary: FLOPs per width only; "
                  "predict: run the model trained in --workdir on --input.")
flags.DEFINE_string("input", None, "predict: a .tsv (GLUE columns) or .jsonl file of inputs.")
flags.DEFINE_string("output", None, "predict: where to write predictions (JSONL).")
flags.DEFINE_string("budget", "", "predict: route to this FLOPs budget, e.g. 2.5x (reduction) or "
                    "0.4gflops (per example), calibrated on the run's held-out training examples; "
                    "default: the rule the run was trained and reported with.")
flags.DEFINE_list("batch_buckets", ["1", "8", "32"], "predict: batch sizes to precompile.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # orbax logs every file it writes at INFO; keep the run's own progress readable.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  if FLAGS.mode == "predict":
    if not FLAGS.input or not FLAGS.output:
      raise app.UsageError("--mode=predict needs --input and --output")
    result = predict.run(FLAGS.workdir, FLAGS.input, FLAGS.output,
                         tuple(int(b) for b in FLAGS.batch_buckets), FLAGS.budget)
    print(open(f"{FLAGS.output}.summary.md").read(), end="")
    logging.info("%d predictions in %s (%.1f examples/s)", result["examples"], FLAGS.output,
                 result["examples_per_second"])
    return
  if FLAGS.config is None:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --config")
  if FLAGS.mode == "summary":
    summary.run(FLAGS.config, FLAGS.workdir)
    print(open(f"{FLAGS.workdir}/model_summary.md").read(), end="")
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(open(f"{FLAGS.workdir}/report.md").read(), end="")
  logging.info("Reports in %s", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
