"""Command-line entry point: flags (`sharcs_jax.cli`) -> config -> one function per mode.

    python -m sharcs_jax.main --config=configs/qqp.py --workdir=/tmp/sharcs_qqp
    python -m sharcs_jax.main --mode=predict --workdir=/tmp/sharcs_qqp \
        --input=dev.tsv --output=/tmp/predictions.jsonl
    python -m sharcs_jax.main --config=... --workdir=... --distributed   # one per host (launch/)
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging

from sharcs_jax import cli
from sharcs_jax import config as config_lib
from sharcs_jax import parallel
from sharcs_jax.checkpoint import quiet_orbax_logging
from sharcs_jax.errors import RunError, one_line_errors
from sharcs_jax.run import load_run
from sharcs_jax.serve import predict, summary
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.onnx.runner import MissingExtra, usable_cores
from sharcs_jax.train import loop as train

FLAGS = cli.FLAGS
flags.adopt_module_key_flags(cli)  # --help lists them


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_orbax_logging()
  if FLAGS.distributed or FLAGS.coordinator_address:
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  {"train": train_mode, "summary": summary_mode, "predict": predict_mode,
   "export": export_mode, "serve": serve_mode}[FLAGS.mode]()


def train_mode() -> None:
  """The one training loop, with the method the config names (`train.loop.Method`)."""
  from sharcs_jax.baselines.train_early_exit import ExitTraining

  config = cli.checked_config()
  method = {"sharcs": train.SharcsTraining, "early_exit": ExitTraining}[config.model.method]
  train.fit(config, FLAGS.workdir, method)
  if parallel.is_primary():
    print(open(os.path.join(FLAGS.workdir, method.report)).read(), end="")
  logging.info("Reports in %s", FLAGS.workdir)


def summary_mode() -> None:
  summary.run(cli.checked_config(), FLAGS.workdir)
  print(open(os.path.join(FLAGS.workdir, "model_summary.md")).read(), end="")


def predict_mode() -> None:
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError("--mode=predict needs --input and --output")
  result = predict.run(FLAGS.workdir, FLAGS.input, FLAGS.output,
                       tuple(int(b) for b in FLAGS.batch_buckets), **cli.routing(),
                       precision=cli.checked_precision("auto"), runtime=FLAGS.runtime)
  print(open(f"{FLAGS.output}.summary.md").read(), end="")
  logging.info("%d predictions in %s (%.1f examples/s)", result["examples"], FLAGS.output,
               result["examples_per_second"])


def export_mode() -> None:
  if not FLAGS.output:
    raise app.UsageError("--mode=export needs --output (a directory)")
  from sharcs_jax.serve.export import writer as export  # jax.export only where it is used
  export.check_output(FLAGS.output, FLAGS.workdir)  # before the minutes of loading and compiling
  engine = Engine.from_workdir(FLAGS.workdir, **cli.routing(),
                               precision=cli.checked_precision("fp32"), runtime=FLAGS.runtime)
  manifest = export.export_engine(engine, FLAGS.output)
  logging.info("Exported %d parts (routing: %s) to %s", len(manifest["parts"]),
               manifest["routing"]["budget"] or "router argmax", FLAGS.output)


def serve_mode() -> None:
  """The HTTP server (`serve.http.serve`) until SIGTERM; every flag is checked and the run
  loaded (a missing or damaged run is one line) before the port is taken."""
  try:
    from sharcs_jax.serve.http import app as http
  except ImportError as e:
    raise MissingExtra(f"--mode=serve needs the 'serve' install extra (bash launch/install.sh "
                       f"serve): {e}") from None
  if not 0 < FLAGS.port < 65536:
    raise RunError(f"--port={FLAGS.port} is not a port")
  cores = usable_cores()
  options = http.ServerOptions.checked(
      max_batch_tokens=FLAGS.max_batch_tokens, max_wait_ms=FLAGS.max_wait_ms,
      max_queued_pairs=FLAGS.max_queued_pairs, request_timeout_s=FLAGS.request_timeout_s,
      max_client_batch_size=FLAGS.max_client_batch_size, payload_limit=FLAGS.payload_limit,
      workers=FLAGS.workers, runtime=FLAGS.runtime, cores=cores)
  threads = cores // FLAGS.workers if FLAGS.workers > 1 else 0  # 0: every usable core
  precision = cli.checked_precision("auto")
  run = load_run(FLAGS.workdir)
  build = lambda: Engine.from_run(run, **cli.routing(), precision=precision,
                                  runtime=FLAGS.runtime, threads=threads)
  code = http.serve(build, FLAGS.host, FLAGS.port, options,
                    lambda engine: http.engine_info(engine, options, FLAGS.rule, FLAGS.budget),
                    lambda line: logging.info("%s", line))
  logging.flush()
  sys.exit(code)


if __name__ == "__main__":
  app.run(one_line_errors(main, MissingExtra), flags_parser=config_lib.parse_flags)
