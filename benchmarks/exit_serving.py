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

import numpy as np
from absl import app, flags

from benchmarks import common
from sharcs_jax import report
from sharcs_jax.checkpoint import load_kept_exit
from sharcs_jax.data import batching, glue
from sharcs_jax.serve import evaluate, routing
from sharcs_jax.serve.exit_engine import ExitEngine

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

FULL_DEPTH = "full depth"


def main(argv):
  del argv
  exit_layers = [int(layer) for layer in FLAGS.exit_layers] or None
  kept = load_kept_exit(FLAGS.workdir)
  config, model, _ = kept
  task = glue.get_task(config.task)
  serve = lambda **options: ExitEngine.from_kept(FLAGS.workdir, *kept, runtime=FLAGS.runtime,
                                                 precision=FLAGS.precision, **options)
  engine = serve(exit_layers=exit_layers)
  _, dev, calibration = glue.run_splits(config)
  if calibration is None:
    raise app.UsageError(f"{FLAGS.workdir}: the run holds no calibration split to fit the "
                         "budgets on; train it with --config.routing.calibration_examples > 0")
  dev = glue.first(dev, FLAGS.limit)
  dev_data, calibration_data = batching.encode_splits([dev, calibration], engine.tokenizer,
                                                      engine.length_buckets)
  full = serve(exit_layers=[model.encoder.num_layers])  # one program, the last exit
  engines = {FULL_DEPTH: full}
  calibration_stages, dev_stages = (engine.every_stage(d) for d in (calibration_data, dev_data))
  other = {}  # budget -> the other calibration's dev reduction, computed from every stage
  for budget in FLAGS.budgets:
    engines[budget] = serve(exit_layers=exit_layers, rule=engine.calibrate(
        budget, calibration_data, FLAGS.signal, FLAGS.by_length, calibration_stages))
    if engine.narrow_count:  # the same model's full-width exits alone
      engines[f"{budget}, depth only"] = serve(exit_layers=exit_layers, rule=engine.calibrate(
          budget, calibration_data, FLAGS.signal, every_stage=calibration_stages, narrow=False))
      continue
    unserved = engine.calibrate(budget, calibration_data, FLAGS.signal, not FLAGS.by_length,
                                calibration_stages)
    other[budget] = routing.exit_reduction(unserved, dev_stages,
                                           engine.stage_flops[:, dev_data.bucket_of].T,
                                           dev_data.bucket_of)
  outputs = {}
  candidates = {name: (lambda name=name: outputs.__setitem__(name, engines[name].run(dev_data)))
                for name in engines}
  print(f"{len(dev_data)} {task.name} dev examples, {FLAGS.rounds} rounds per path", flush=True)
  times = common.time_side_by_side(candidates, FLAGS.rounds, warmup=1)
  full_gflops = full.full_depth_gflops(dev_data).mean()
  base_rate = len(dev_data) / float(np.median(times[FULL_DEPTH]))
  data = {"examples": len(dev_data), "task": task.name, "workdir": FLAGS.workdir,
          "exit_pooling": model.pooling, "exit_layers": list(engine.exit_layers),
          "stage_widths": list(engine.stage_widths),
          "signal": FLAGS.signal, "rounds": FLAGS.rounds, "runtime": engine.runtime,
          "precision": engine.precision, "cpu": common.cpu_info(), "paths": {}}
  rows = []
  for name, t in times.items():
    out = outputs[name]
    metrics = evaluate.classification_metrics(out.labels, dev_data.labels, task.metrics)
    rate = len(dev_data) / float(np.median(t))
    rule = engines[name].rule
    entry = {"seconds": t.tolist(), "examples_per_second": rate, "speedup": rate / base_rate,
             "gflops_per_example": float(out.gflops.mean()),
             "dev_reduction": full_gflops / float(out.gflops.mean()),
             "calibration_reduction": rule.calibration_reduction, "rule": rule.to_json(),
             "mean_exit_layer": float(out.exit_layers.mean()),
             "narrow_share": float(np.mean(out.widths < 1.0)), **metrics}
    if name in other:
      entry["dev_reduction_other_calibration"] = other[name]
    data["paths"][name] = entry
    rows.append([name, entry["calibration_reduction"], entry["dev_reduction"],
                 entry.get("dev_reduction_other_calibration", ""),
                 *(100 * v for v in metrics.values()), rate, entry["speedup"],
                 entry["mean_exit_layer"]])
  calibrated = "per length bucket" if FLAGS.by_length else "pooled"
  data["calibration"] = calibrated
  notes = (f"{len(dev_data)} {task.name} dev examples, token ids to labels, {engine.runtime} "
           f"{engine.precision}, exits "
           f"({model.pooling} pooling) after {', '.join(engine.route_names())}, rule "
           f"{FLAGS.signal} "
           f"calibrated {calibrated} on {len(calibration_data)} held-out training examples "
           + ("(a depth-and-width model: both thresholds searched jointly, and its full-width "
              "exits alone beside each budget); " if engine.narrow_count else
              "(the other calibration's dev reduction beside it, from every exit's dev "
              "outputs); ") +
           "median of "
           f"{FLAGS.rounds} interleaved passes; CPU: {common.cpu_line(data['cpu'])}.")
  columns = [name if name == "accuracy" else name.upper() for name in task.metrics]
  common.write_outputs(FLAGS.out, "exit_serving", data, f"{task.name}: the early-exit model "
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
