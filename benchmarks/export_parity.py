"""The exported model against the engine on dev: same labels, probabilities within 1e-5.

Exports the run in --workdir to --export_dir, then loads the export in a fresh process that may
import only jax, numpy and tokenizers (checked through sys.modules) and predicts every dev pair;
reports agreement, load time and directory size as JSON and Markdown. With
--runtime=onnxruntime the fresh process cannot import jax at all (`import jax` raises there), and
its labels are compared with the engine on the same runtime and precision. An early-exit run
(`--config.model.method=early_exit`) exports its stages; each row's exit layer is compared.

    python -m benchmarks.export_parity --workdir=/tmp/sharcs_qqp --export_dir=/tmp/qqp_export \
        --out=/tmp/bench [--runtime=onnxruntime --precision=int8]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from sharcs_jax.serve import export
from sharcs_jax.checkpoint import holds_early_exit, load_kept_exit, quiet_orbax_logging
from sharcs_jax.data import glue
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.exit_engine import ExitEngine
from sharcs_jax.run import load_run

flags.DEFINE_string("workdir", None, "A trained run.", required=True)
flags.DEFINE_string("export_dir", None, "Where to write the export.", required=True)
flags.DEFINE_string("out", None, "Output directory for the report.", required=True)
flags.DEFINE_string("budget", "", "Route to this budget (default: the run's own rule).")
flags.DEFINE_string("signal", "max_prob", "The confidence signal a budget's rule reads.")
flags.DEFINE_integer("limit", 0, "> 0: only the first N dev examples (for tests).")
flags.DEFINE_enum("runtime", "xla", ["xla", "onnxruntime"], "The engine's (and export's) runtime.")
flags.DEFINE_string("precision", "fp32", "The engine's precision (int8 on onnxruntime).")
FLAGS = flags.FLAGS

FORBIDDEN = ("flax", "optax", "orbax", "transformers", "torch")
NO_JAX = ("jax", "jaxlib")  # an ONNX export's loader runs where these cannot be imported
LOADER = """
import json, sys, time
for name in sys.argv[4].split(",") if sys.argv[4] else []:
  sys.modules[name] = None  # `import name` now raises ImportError
start = time.perf_counter()
from sharcs_jax.serve.exported import ExportedModel
model = ExportedModel.load(sys.argv[1])
loaded = time.perf_counter() - start
texts = json.load(open(sys.argv[2]))
start = time.perf_counter()
out = model.predict(texts)
seconds = time.perf_counter() - start
forbidden = sorted(m for m, module in sys.modules.items()  # None: blocked, not loaded
                   if module is not None and m.split(".")[0] in sys.argv[5].split(","))
routed = out.exit_layers if model.model == "early_exit" else out.widths
json.dump({"labels": out.labels.tolist(), "probabilities": out.probabilities.tolist(),
           "routed": routed.tolist(), "load_seconds": loaded, "predict_seconds": seconds,
           "forbidden_modules": forbidden}, open(sys.argv[3], "w"))
"""


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def main(argv):
  del argv
  quiet_orbax_logging()
  early_exit = holds_early_exit(FLAGS.workdir)
  if early_exit:  # an early-exit run: its stages, each row's exit layer in place of its width
    kept = load_kept_exit(FLAGS.workdir)
    engine = ExitEngine.from_kept(FLAGS.workdir, *kept, budget=FLAGS.budget, signal=FLAGS.signal,
                                  runtime=FLAGS.runtime, precision=FLAGS.precision)
    split = glue.first(glue.run_splits(kept[0])[1], FLAGS.limit)
  else:
    run = load_run(FLAGS.workdir)
    engine = Engine.from_run(run, budget=FLAGS.budget, signal=FLAGS.signal,
                             runtime=FLAGS.runtime, precision=FLAGS.precision)
    (split,) = run.splits("dev", limit=FLAGS.limit)
  blocked = NO_JAX if FLAGS.runtime == "onnxruntime" else ()
  start = time.perf_counter()
  manifest = export.export_engine(engine, FLAGS.export_dir)
  export_seconds = time.perf_counter() - start
  reference = engine.predict(split.texts)
  routed = reference.exit_layers if early_exit else reference.widths
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "texts.json"), "w") as f:
      json.dump(split.texts, f)
    result = subprocess.run([sys.executable, "-c", LOADER, FLAGS.export_dir,
                             os.path.join(tmp, "texts.json"), os.path.join(tmp, "out.json"),
                             ",".join(blocked), ",".join(FORBIDDEN + blocked)],
                            capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"the export loader failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(tmp, "out.json")) as f:
      loaded = json.load(f)
  probabilities = np.asarray(loaded["probabilities"], np.float32)
  data = {
      "task": engine.task.name, "examples": len(split), "routing": manifest["routing"],
      "runtime": manifest["runtime"], "precision": manifest["precision"],
      "imports_blocked_in_loader": list(blocked),
      "labels_equal": float(np.mean(np.asarray(loaded["labels"]) == reference.labels)),
      "model": manifest["model"],
      ("exit_layers_equal" if early_exit else "widths_equal"): float(
          np.mean(np.asarray(loaded["routed"]) == routed)),
      "max_probability_difference": float(np.abs(probabilities - reference.probabilities).max()),
      "forbidden_modules_imported": loaded["forbidden_modules"],
      "load_seconds": loaded["load_seconds"], "predict_seconds": loaded["predict_seconds"],
      "export_seconds": export_seconds, "directory_bytes": directory_bytes(FLAGS.export_dir),
      "files": sorted(os.listdir(FLAGS.export_dir)),
  }
  rows = [[k, v if not isinstance(v, list) else ", ".join(map(str, v)) or "none"]
          for k, v in data.items() if k != "routing"]
  common.write_outputs(FLAGS.out, "export_parity", data, "Exported model against the engine",
                       ["", "value"], rows,
                       f"{engine.task.name} dev, routing {manifest['routing']['budget']}, runtime "
                       f"{manifest['runtime']} {manifest['precision']}; the export ran in a fresh "
                       "process importing only " + ("onnxruntime, numpy and tokenizers (import "
                                                    "jax raised there)" if blocked else
                                                    "jax, numpy and tokenizers") + ". CPU: "
                       f"{common.cpu_line(common.cpu_info())}.")
  print(open(os.path.join(FLAGS.out, "export_parity.md")).read())


if __name__ == "__main__":
  app.run(main)
