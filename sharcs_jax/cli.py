"""The command line's flags, declared once and checked before any work; `sharcs_jax.main` runs
the mode they name."""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from sharcs_jax import config as config_lib
from sharcs_jax.errors import RunError
from sharcs_jax.serve import precision as precision_lib
from sharcs_jax.serve.dispatch import BATCH_BUCKETS

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


def routing() -> dict[str, str]:
  """How predict, export and serve route: the flags the engine takes as they are."""
  return dict(budget=FLAGS.budget, rule=FLAGS.rule, signal=FLAGS.signal,
              start_budget=FLAGS.start_budget)


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
