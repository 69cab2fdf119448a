"""The early-exit model served by the engine: dev accuracy and examples/s at each budget, beside
its own full depth, in interleaved rounds in one process.

    python -m benchmarks.exit_serving --workdir=W --out=O [--budgets=1.5x,2x,2.5x] [--rounds=3] \
        [--exit_layers=1,2,3,4,5,6] [--signal=entropy] [--runtime=onnxruntime --precision=int8]

W is an early-exit run (`baselines.train_early_exit`, e.g. the trade-off benchmark's
runs/early_exit_mean). Each budget's exit threshold is calibrated on the run's calibration split
(held-out training examples) and applied to dev. The full depth is one program of every layer
and the last exit. A depth-and-width run (`config.model.exit_widths` with a narrow width) is
served with both thresholds searched jointly, and beside it at each budget its full-width exits
alone ("2x, depth only"): what the narrow width adds. Token ids to labels; writes
exit_serving.json, .md and .png.
"""

from __future__ import annotations

import os

from absl import app, flags

from benchmarks import common, exit_budgets
from sharcs_jax import report

flags.DEFINE_string("workdir", None, "An early-exit run.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_list("budgets", ["1.5x", "2x", "2.5x"], "FLOPs budgets the exits are calibrated to.")
flags.DEFINE_list("exit_layers", [], "Layers (1-based) with an exit the rule reads; default all.")
flags.DEFINE_string("signal", "entropy", "Confidence signal of the exit rule (DeeBERT: entropy).")
flags.DEFINE_bool("by_length", False, "Calibrate a threshold per length bucket (else one pooled "
                  "threshold; the other calibration's dev reduction is reported beside it).")
flags.DEFINE_string("runtime", "xla", "Runtime of every path: xla (fp32) or onnxruntime.")
flags.DEFINE_string("precision", "fp32", "Precision of every path: fp32, or on onnxruntime int8 "
                    "(auto: int8 where the CPU has an int8 dot product).")
flags.DEFINE_integer("rounds", 3, "Interleaved passes over dev per path.")
flags.DEFINE_integer("limit", 0, "> 0: only the first N dev examples (for tests).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  exit_layers = [int(layer) for layer in FLAGS.exit_layers] or None
  run = exit_budgets.open_exit_run(FLAGS.workdir, exit_layers=exit_layers,
                                   runtime=FLAGS.runtime, precision=FLAGS.precision,
                                   limit=FLAGS.limit)
  data = exit_budgets.serve_budgets(run, FLAGS.budgets, signal=FLAGS.signal,
                                    by_length=FLAGS.by_length, rounds=FLAGS.rounds)
  rows = [[name, p["calibration_reduction"], p["dev_reduction"],
           p.get("dev_reduction_other_calibration", ""),
           *(100 * p[m] for m in run.task.metrics), p["examples_per_second"], p["speedup"],
           p["mean_exit_layer"]] for name, p in data["paths"].items()]
  rows += [[budget, "out of reach", "", "", *("" for _ in run.task.metrics), "", "", ""]
           for budget in data["out_of_reach"]]
  engine = run.engine
  notes = (f"{data['examples']} {run.task.name} dev examples, token ids to labels, "
           f"{engine.runtime} {engine.precision}, exits ({data['exit_pooling']} pooling) after "
           f"{', '.join(engine.route_names())}, rule {FLAGS.signal} calibrated "
           f"{data['calibration']} on {data['calibration_examples']} held-out training examples "
           + ("(a depth-and-width model: both thresholds searched jointly, and its full-width "
              "exits alone beside each budget); " if engine.narrow_count else
              "(the other calibration's dev reduction beside it, from every exit's dev "
              "outputs); ") +
           f"median of {FLAGS.rounds} interleaved passes; CPU: {common.cpu_line(data['cpu'])}.")
  columns = [name if name == "accuracy" else name.upper() for name in run.task.metrics]
  common.write_outputs(FLAGS.out, "exit_serving", data, f"{run.task.name}: the early-exit model "
                       "served", ["path", "reduction (calibration)", "reduction (dev)",
                                  "reduction (dev, other calibration)", *columns,
                                  "examples/s", "speed-up", "mean exit layer"], rows, notes)
  plot(os.path.join(FLAGS.out, "exit_serving.png"), data)
  print(open(os.path.join(FLAGS.out, "exit_serving.md")).read())


def plot(path: str, data: dict) -> None:
  fig, axes = report.pyplot().subplots(1, 2, figsize=(8, 3.5))
  names = list(data["paths"])
  paths = [data["paths"][n] for n in names]
  axes[0].plot([p["dev_reduction"] for p in paths], [100 * p["accuracy"] for p in paths], "o-")
  axes[0].set_xlabel("FLOPs reduction (dev)")
  axes[0].set_ylabel("dev accuracy (%)")
  axes[1].bar(names, [p["examples_per_second"] for p in paths])
  axes[1].set_ylabel("examples / s")
  fig.suptitle(f"{data['task']}: early exit served")
  report.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
  app.run(main)
