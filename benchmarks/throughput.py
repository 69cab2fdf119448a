"""A trained run's dev split end to end (token ids to labels): the SHARCS engine against the full-width program.

    python -m benchmarks.throughput --workdir=/tmp/sharcs_qqp --out=/tmp/bench [--rounds=3] \
        [--budget=2x --rule=cascade] [--precision=auto]

Both paths use the trained model in --workdir, the same precision, the same length buckets and
the same batch buckets (full batches of 32, remainders as the engine splits them), and run in
interleaved rounds in one process. Writes throughput.json, throughput.md and throughput.png into --out.

An early-exit run (`config.model.method=early_exit`) is served by its exit engine at --budget
(default: its config's budget), the threshold calibrated on its calibration split, beside its
full depth as one program (`exit_budgets`).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from benchmarks import common, exit_budgets
from sharcs_jax import evaluate
from sharcs_jax import report
from sharcs_jax.checkpoint import holds_early_exit
from sharcs_jax.serve.dispatch import BATCH_BUCKETS
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.precision import PRECISIONS
from sharcs_jax.serve.programs import Programs
from sharcs_jax.run import load_run

flags.DEFINE_string("workdir", None, "A trained run (its checkpoints); its task's dev split is read.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_list("batch_buckets", [str(b) for b in BATCH_BUCKETS],
                  "Batch sizes compiled for both paths.")
flags.DEFINE_integer("rounds", 3, "Interleaved passes over dev per path.")
flags.DEFINE_string("budget", "", "Route to this budget ('2.5x' or '0.4gflops'), calibrated on "
                    "the run's held-out training examples; default: the run's own rule.")
flags.DEFINE_string("rule", "router", "Rule that meets --budget (router, cascade, ...; an "
                    "early-exit run: its exit rule).")
flags.DEFINE_string("signal", "entropy", "An early-exit run: confidence of its exit rule.")
flags.DEFINE_enum("precision", "fp32", list(PRECISIONS["xla"]), "Compute precision of both paths "
                  "(auto: bf16 where the CPU multiplies it natively).")
flags.DEFINE_integer("limit", 0, "> 0: only the first N dev examples (for tests).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  batch_buckets = tuple(int(b) for b in FLAGS.batch_buckets)
  if holds_early_exit(FLAGS.workdir):
    return exit_main()
  run = load_run(FLAGS.workdir)
  engine = Engine.from_run(run, batch_buckets=batch_buckets, budget=FLAGS.budget,
                           rule=FLAGS.rule, precision=FLAGS.precision)
  full = Programs(engine.model, engine.variables["params"], batch_buckets=batch_buckets,
                  length_buckets=engine.length_buckets, kinds=("forward",),
                  cache_dir=os.path.join(FLAGS.workdir, "executables"))
  (dev,) = run.encoded("dev", limit=FLAGS.limit)
  outputs = {}
  candidates = {
      "SHARCS engine": lambda: outputs.__setitem__("SHARCS engine", engine.run(dev).labels),
      "full width": lambda: outputs.__setitem__(
          "full width", common.full_width_labels(full, engine.variables["params"], dev)),
  }
  print(f"{len(dev)} {run.task.name} dev examples, {FLAGS.rounds} rounds per path", flush=True)
  times = common.time_side_by_side(candidates, FLAGS.rounds, warmup=1)
  predictions = engine.run(dev)
  full_gflops = engine.full_gflops(dev)
  data = {"examples": len(dev), "batch_buckets": list(batch_buckets), "rounds": FLAGS.rounds,
          "workdir": FLAGS.workdir, "precision": engine.precision, "rule": engine.rule.to_json(),
          "cpu": common.cpu_info(), "paths": {}}
  rows = []
  for name, t in times.items():
    metrics = evaluate.classification_metrics(outputs[name], dev.labels, run.task.metrics)
    gflops = predictions.gflops.mean() if name == "SHARCS engine" else full_gflops.mean()
    entry = {"median_seconds": float(np.median(t)), "seconds": t.tolist(),
             "examples_per_second": len(dev) / float(np.median(t)), "gflops_per_example": gflops,
             **metrics}
    data["paths"][name] = entry
    rows.append([name, entry["examples_per_second"], *(100 * v for v in metrics.values()),
                 gflops])
  sharcs, base = data["paths"]["SHARCS engine"], data["paths"]["full width"]
  data["speedup"] = sharcs["examples_per_second"] / base["examples_per_second"]
  data["flops_reduction"] = base["gflops_per_example"] / sharcs["gflops_per_example"]
  data["accuracy_drop_points"] = 100 * (base["accuracy"] - sharcs["accuracy"])
  data["share_per_width"] = predictions.share_per_width(engine.widths)
  notes = (f"{len(dev)} {run.task.name} dev examples, token ids to labels, {engine.precision}, "
           f"batch buckets {batch_buckets}, CPU: {common.cpu_line(data['cpu'])}; "
           f"median of {FLAGS.rounds} interleaved passes. SHARCS is {data['speedup']:.2f}x the "
           f"full-width throughput at {data['flops_reduction']:.2f}x fewer FLOPs, "
           f"{data['accuracy_drop_points']:+.2f} points accuracy drop; routed "
           + ", ".join(f"{w}: {100 * s:.1f}%" for w, s in data["share_per_width"].items()) + ".")
  columns = [name if name == "accuracy" else name.upper() for name in metrics]  # the task's
  common.write_outputs(FLAGS.out, "throughput", data, f"{run.task.name} dev throughput", [
      "path", "examples/s", *columns, "GFLOPs/example"], rows, notes)
  plot(os.path.join(FLAGS.out, "throughput.png"), data)
  print(open(os.path.join(FLAGS.out, "throughput.md")).read())


EXIT_ENGINE = "early-exit engine"


def exit_main() -> None:
  """An early-exit run's throughput: its engine at one budget against its full depth."""
  if FLAGS["rule"].present or FLAGS["batch_buckets"].present:
    raise app.UsageError("an early-exit run is served by its exit rule on the engine's batch "
                         "buckets: --rule and --batch_buckets are for SHARCS runs")
  run = exit_budgets.open_exit_run(FLAGS.workdir, precision=FLAGS.precision, limit=FLAGS.limit)
  budget = FLAGS.budget or run.config.routing.budget or "2x"
  data = exit_budgets.serve_budgets(run, [budget], signal=FLAGS.signal, rounds=FLAGS.rounds)
  if budget in data["out_of_reach"]:
    raise app.UsageError(data["out_of_reach"][budget])
  paths = data["paths"] = {EXIT_ENGINE: data["paths"][budget],
                           exit_budgets.FULL_DEPTH: data["paths"][exit_budgets.FULL_DEPTH]}
  engine, base = paths[EXIT_ENGINE], paths[exit_budgets.FULL_DEPTH]
  data.update(budget=budget, speedup=engine["speedup"], flops_reduction=engine["dev_reduction"],
              accuracy_drop_points=100 * (base["accuracy"] - engine["accuracy"]))
  metrics = run.task.metrics
  rows = [[name, p["examples_per_second"], *(100 * p[m] for m in metrics),
           p["gflops_per_example"], p["mean_exit_layer"]] for name, p in paths.items()]
  notes = (f"{data['examples']} {run.task.name} dev examples, token ids to labels, "
           f"{data['runtime']} {data['precision']}, an early-exit run's {FLAGS.signal} rule "
           f"calibrated to {budget} on {data['calibration_examples']} held-out training examples "
           f"({engine['calibration_reduction']:.2f}x there), CPU: {common.cpu_line(data['cpu'])}; "
           f"median of {FLAGS.rounds} interleaved passes. The exits serve {data['speedup']:.2f}x "
           f"the full depth's throughput at {data['flops_reduction']:.2f}x fewer FLOPs, "
           f"{data['accuracy_drop_points']:+.2f} points accuracy drop.")
  columns = [name if name == "accuracy" else name.upper() for name in metrics]
  common.write_outputs(FLAGS.out, "throughput", data, f"{run.task.name} dev throughput", [
      "path", "examples/s", *columns, "GFLOPs/example", "mean exit layer"], rows, notes)
  plot(os.path.join(FLAGS.out, "throughput.png"), data)
  print(open(os.path.join(FLAGS.out, "throughput.md")).read())


def plot(path: str, data: dict) -> None:
  names = list(data["paths"])
  fig, axes = report.pyplot().subplots(1, 2, figsize=(8, 3.5))
  axes[0].bar(names, [data["paths"][n]["examples_per_second"] for n in names],
              color=["tab:red", "tab:blue"])
  axes[0].set_ylabel("examples / s")
  axes[0].set_title(f"speed-up {data['speedup']:.2f}x")
  axes[1].bar(names, [100 * data["paths"][n]["accuracy"] for n in names],
              color=["tab:red", "tab:blue"])
  axes[1].set_ylim(min(100 * data["paths"][n]["accuracy"] for n in names) - 5, None)
  axes[1].set_ylabel("dev accuracy (%)")
  report.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
  app.run(main)
