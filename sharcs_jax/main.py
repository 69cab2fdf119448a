"""Command-line entry point: flags -> config -> one function per mode. Kept short on purpose.

    python -m sharcs_jax.main --config=configs/qqp.py --workdir=/tmp/sharcs_qqp
    python -m sharcs_jax.main --mode=predict --workdir=/tmp/sharcs_qqp \
        --input=dev.tsv --output=/tmp/predictions.jsonl
    python -m sharcs_jax.main --config=... --workdir=... --distributed   # one per host (launch/)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sharcs_jax import config as config_lib
from sharcs_jax import parallel
from sharcs_jax.serve import predict, summary
from sharcs_jax.serve import precision as precision_lib
from sharcs_jax.serve.onnx.runner import MissingExtra, usable_cores
from sharcs_jax.train import loop as train
from sharcs_jax.checkpoint import quiet_orbax_logging
from sharcs_jax.serve.dispatch import BATCH_BUCKETS
from sharcs_jax.serve.engine import Engine
from sharcs_jax.errors import RunError, one_line_errors
from sharcs_jax.run import load_run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/qqp.py or "
                                "configs/qqp.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and reports; re-running the "
                    "same command resumes from its latest checkpoint.")
flags.DEFINE_enum("mode", "train", ["train", "summary", "predict", "export", "serve"],
                  "train: train SHARCS and report on dev; summary: FLOPs per width only; "
                  "predict: run the model trained in --workdir on --input; export: write the "
                  "model trained in --workdir to --output as jax.export parts + manifest; serve: "
                  "TEI-compatible HTTP /predict for the model trained in --workdir.")
flags.DEFINE_string("input", None, "predict: a .tsv (GLUE columns) or .jsonl file of inputs.")
flags.DEFINE_string("output", None, "predict: where to write predictions (JSONL); export: the "
                    "export directory.")
flags.DEFINE_string("budget", "", "predict, export: route to this FLOPs budget, e.g. 2.5x "
                    "(reduction) or 0.4gflops (per example), calibrated on the run's held-out "
                    "training examples; default: the rule the run was trained and reported with.")
flags.DEFINE_enum("rule", "router", ["router", "cascade", "router+cascade"], "predict, export "
                  "with --budget: how the budget is met: 'router' (argmax under a cost weight), "
                  "'cascade' (narrowest width first; the unsure escalate), 'router+cascade' (the "
                  "router, at --start_budget, picks where each input starts).")
flags.DEFINE_enum("signal", "max_prob", ["max_prob", "margin", "entropy"], "cascade: the "
                  "confidence an input escalates on.")
flags.DEFINE_string("start_budget", "", "router+cascade: the router's own budget, e.g. 3x.")
flags.DEFINE_list("batch_buckets", [str(b) for b in BATCH_BUCKETS],
                  "predict: batch sizes to precompile.")
flags.DEFINE_enum("runtime", "xla", list(precision_lib.RUNTIMES), "predict, export: what runs "
                  "the programs: xla (jax's compiled programs), or onnxruntime (the same programs "
                  "as ONNX models; the 'serve' install extra).")
flags.DEFINE_enum("precision", None, ["fp32", "bf16", "int8", "auto"], "The matmuls' precision: "
                  "fp32 or bf16 on xla (auto: bf16 where the CPU multiplies bf16 natively, "
                  "avx512_bf16 or AMX), fp32 or int8 on onnxruntime (auto: int8 where the CPU "
                  "has an int8 dot product, VNNI or AVX2). Default: auto for predict; fp32 for "
                  "export, whose files may run on another CPU.")
flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on.")
flags.DEFINE_integer("port", 8080, "serve: the port to listen on.")
flags.DEFINE_integer("max_batch_tokens", 16384, "serve: tokens the worker takes from the queue "
                     "per engine call (oldest requests first).")
flags.DEFINE_float("max_wait_ms", 0.0, "serve: how long a batch may wait for more requests.")
flags.DEFINE_integer("max_client_batch_size", 32, "serve: inputs per request (413 above).")
flags.DEFINE_integer("payload_limit", 2_000_000, "serve: bytes per request body (413 above).")
flags.DEFINE_integer("max_queued_pairs", 1024, "serve: queued inputs before 429.")
flags.DEFINE_float("request_timeout_s", 30.0, "serve: seconds queued before 504.")
flags.DEFINE_integer("workers", 1, "serve, --runtime=onnxruntime: threads that each run the "
                     "engine on a batch of their own, the usable cores split among them.")
flags.DEFINE_bool("distributed", False, "Join a jax.distributed job: coordinator and process ids "
                  "from the flags below, else detected from SLURM, Cloud TPU or JAX_COORDINATOR_* "
                  "environment variables.")
flags.DEFINE_string("coordinator_address", None, "distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "distributed: how many processes take part.")
flags.DEFINE_integer("process_id", None, "distributed: this process's index.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_orbax_logging()
  if FLAGS.distributed or FLAGS.coordinator_address:
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  {"train": train_mode, "summary": summary_mode, "predict": predict_mode,
   "export": export_mode, "serve": serve_mode}[FLAGS.mode]()


def checked_precision(default: str) -> str:
  """--precision (or `default`), refused before any work where --runtime does not run it."""
  precision = FLAGS.precision or default
  try:
    precision_lib.resolve(precision, "cpu", frozenset(), FLAGS.runtime)
  except ValueError as e:
    raise RunError(f"--precision={precision} --runtime={FLAGS.runtime}: {e}") from None
  return precision


def checked_config() -> Any:
  """--config, a missing file one line (ml_collections' own is a traceback)."""
  if FLAGS["config"].present:
    path = config_flags.get_config_filename(FLAGS["config"]).partition(":")[0]
    if not os.path.isfile(path):
      raise RunError(f"--config={path}: no such file")
  if FLAGS.config is None:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --config")
  config_lib.validate(FLAGS.config)  # every value, before any work
  return FLAGS.config


def train_mode() -> None:
  """The one training loop, with the method the config names (`train.loop.Method`)."""
  from sharcs_jax.baselines.train_early_exit import ExitTraining

  config = checked_config()
  method = {"sharcs": train.SharcsTraining, "early_exit": ExitTraining}[config.model.method]
  train.fit(config, FLAGS.workdir, method)
  if parallel.is_primary():
    print(open(os.path.join(FLAGS.workdir, method.report)).read(), end="")
  logging.info("Reports in %s", FLAGS.workdir)


def summary_mode() -> None:
  summary.run(checked_config(), FLAGS.workdir)
  print(open(os.path.join(FLAGS.workdir, "model_summary.md")).read(), end="")


def predict_mode() -> None:
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError("--mode=predict needs --input and --output")
  result = predict.run(FLAGS.workdir, FLAGS.input, FLAGS.output,
                       tuple(int(b) for b in FLAGS.batch_buckets), FLAGS.budget, FLAGS.rule,
                       FLAGS.signal, FLAGS.start_budget, checked_precision("auto"), FLAGS.runtime)
  print(open(f"{FLAGS.output}.summary.md").read(), end="")
  logging.info("%d predictions in %s (%.1f examples/s)", result["examples"], FLAGS.output,
               result["examples_per_second"])


def export_mode() -> None:
  if not FLAGS.output:
    raise app.UsageError("--mode=export needs --output (a directory)")
  from sharcs_jax.serve.export import writer as export  # jax.export only where it is used
  export.check_output(FLAGS.output, FLAGS.workdir)  # before the minutes of loading and compiling
  engine = Engine.from_workdir(FLAGS.workdir, budget=FLAGS.budget, rule=FLAGS.rule,
                               signal=FLAGS.signal, start_budget=FLAGS.start_budget,
                               precision=checked_precision("fp32"), runtime=FLAGS.runtime)
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
  precision = checked_precision("auto")
  run = load_run(FLAGS.workdir)
  build = lambda: Engine.from_run(
      run, budget=FLAGS.budget, rule=FLAGS.rule, signal=FLAGS.signal,
      start_budget=FLAGS.start_budget, precision=precision, runtime=FLAGS.runtime,
      threads=threads)
  code = http.serve(build, FLAGS.host, FLAGS.port, options,
                    lambda engine: http.engine_info(engine, options, FLAGS.rule, FLAGS.budget),
                    lambda line: logging.info("%s", line))
  logging.flush()
  sys.exit(code)


if __name__ == "__main__":
  app.run(one_line_errors(main, MissingExtra), flags_parser=config_lib.parse_flags)
