"""Serve to a budget: accuracy, FLOPs and engine speed for a sweep of FLOPs-reduction targets.

For each target the routing rule (`--rule`: the router's argmax(router logits - lam * relative
cost), or the cascade's confidence threshold) is calibrated on the run's held-out training
examples (never on dev); the table gives the reduction reached there and,
beside it, the dev figures: accuracy (F1 where defined), GFLOPs, reduction, share per width, and
the engine's measured examples/s (token ids to labels, batch buckets up to 32). A target beyond
the model's reach (below 1x, or cheaper than all-narrowest) is reported with the reachable range.

    python -m benchmarks.pareto --workdir=/tmp/sharcs_qqp --out=/tmp/bench [--rule=cascade]
        [--runtime=onnxruntime --precision=int8]

On another runtime or precision every figure (calibration included) comes from its programs.
An early-exit run (`config.model.method=early_exit`) is swept with its exit rule (`--signal`,
default DeeBERT's entropy), each budget served by its exit engine beside its full depth and
each exit alone ('max': every row at the first exit; `exit_budgets`).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from benchmarks import common, exit_budgets
from sharcs_jax.serve import routing
from sharcs_jax.checkpoint import holds_early_exit, quiet_orbax_logging
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.precision import PRECISIONS, RUNTIMES
from sharcs_jax.run import load_run
from sharcs_jax.model.widths import width_label

flags.DEFINE_string("workdir", None, "A trained run whose config held back calibration examples.",
                    required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_list("budgets", ["1x", "1.25x", "1.5x", "1.75x", "2x", "2.25x", "2.5x", "3x", "max"],
                  "Reduction targets ('2x') or GFLOPs per example ('0.4gflops'); 'max' is the "
                  "narrowest width everywhere.")
flags.DEFINE_bool("calibrate_on_dev", False, "Calibrate on dev itself (for runs that held back no "
                  "training examples); the dev figures are then not held-out estimates.")
flags.DEFINE_integer("rounds", 2, "Timed engine passes over dev per budget (median).")
flags.DEFINE_integer("limit", 0, "> 0: only the first N dev examples (for tests).")
flags.DEFINE_enum("rule", "router", list(routing.RULES), "How each budget is met.")
flags.DEFINE_enum("signal", "max_prob", list(routing.CONFIDENCE_SIGNALS), "cascade: confidence "
                  "(an early-exit run: its exit rule's, entropy unless given).")
flags.DEFINE_string("start_budget", "", "router+cascade: the router's own budget, e.g. 3x.")
flags.DEFINE_enum("runtime", "xla", list(RUNTIMES), "What runs the engine's programs.")
flags.DEFINE_enum("precision", "fp32", sorted(set(sum(PRECISIONS.values(), ()))),
                  "The engine's precision (bf16 on xla, int8 on onnxruntime).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  quiet_orbax_logging()
  if holds_early_exit(FLAGS.workdir):
    return exit_main()
  run = load_run(FLAGS.workdir)
  engine = Engine.from_run(run, runtime=FLAGS.runtime, precision=FLAGS.precision)
  task = run.task
  (dev,) = run.encoded("dev", limit=FLAGS.limit)
  calibration = dev if FLAGS.calibrate_on_dev else run.encoded("calibration")[0]
  source = "dev itself" if FLAGS.calibrate_on_dev else "held-out training examples"
  sweep = common.BudgetSweep.build(engine, dev, calibration)
  reach = sweep.reachable()

  rows, data = [], {"task": task.name, "workdir": FLAGS.workdir, "rule": FLAGS.rule,
                    "runtime": engine.runtime, "precision": engine.precision,
                    "signal": FLAGS.signal, "start_budget": FLAGS.start_budget,
                    "dev_examples": len(dev),
                    "calibration_examples": len(calibration), "calibration_source": source,
                    "reachable_reductions": list(reach),
                    "budgets": []}
  for spec in FLAGS.budgets:
    budget = routing.Budget(reduction=reach[1]) if spec == "max" else routing.parse_budget(spec)
    try:
      rule, dev_result = sweep.at_budget(
          budget, FLAGS.rule, FLAGS.signal,
          routing.parse_budget(FLAGS.start_budget) if FLAGS.start_budget else None)
    except ValueError as e:
      data["budgets"].append({"budget": spec, "error": str(e)})
      rows.append([spec, "out of reach", "", "", "", "", "", ""])
      continue
    engine.rule = rule
    times = common.time_side_by_side({"engine": lambda: engine.run(dev)}, FLAGS.rounds, warmup=1,
                                     progress=False)["engine"]
    entry = {"budget": spec, "rule": rule.to_json(),
             "calibration_reduction": rule.calibration_reduction, "dev": dev_result,
             "examples_per_second": len(dev) / float(np.median(times))}
    data["budgets"].append(entry)
    rows.append([spec, rule.calibration_reduction, 100 * dev_result["accuracy"],
                 100 * dev_result["f1"] if "f1" in dev_result else "", dev_result["gflops"],
                 dev_result["flops_reduction"],
                 ", ".join(f"{width_label(w)}: {100 * s:.1f}%" for w, s in zip(engine.widths,
                                                                     dev_result["share_per_width"])),
                 entry["examples_per_second"]])
    print(f"budget {spec}: {rule.calibration_reduction:.2f}x on calibration, dev "
          f"{100 * dev_result['accuracy']:.2f}% at {dev_result['flops_reduction']:.2f}x, "
          f"{entry['examples_per_second']:.0f} ex/s", flush=True)
  static = sweep.summary()
  data["full_width"], data["router_argmax"] = static["full_width"], static["sharcs"]
  data["static"] = {width_label(w): static["static"][i] for i, w in enumerate(engine.widths)}
  notes = (f"{task.name} dev ({len(dev)} examples), rules calibrated on {len(calibration)} "
           f"{source}; reachable reductions {reach[0]:g}x to {reach[1]:.2f}x. "
           f"Full width: {100 * static['full_width']['accuracy']:.2f}% at "
           f"{static['full_width']['gflops']:.3f} GFLOPs; the router's own argmax: "
           f"{100 * static['sharcs']['accuracy']:.2f}% at {static['sharcs']['flops_reduction']:.2f}x.")
  name = f"pareto_{task.name}" + ("" if FLAGS.rule == "router" else
                                   f"_{FLAGS.rule.replace('+', '_')}")
  common.write_outputs(FLAGS.out, name, data, f"{task.name}: accuracy to a budget ({FLAGS.rule})",
                       ["budget", "reduction on calibration", "dev accuracy", "dev F1",
                        "dev GFLOPs/example", "dev reduction", "share per width",
                        "engine examples/s"], rows, notes)
  plot(os.path.join(FLAGS.out, f"{name}.png"), data)
  print(open(os.path.join(FLAGS.out, f"{name}.md")).read())


def exit_main() -> None:
  """An early-exit run's sweep: its exit rule at each budget, served and timed."""
  if FLAGS["rule"].present or FLAGS["start_budget"].present or FLAGS.calibrate_on_dev:
    raise app.UsageError("an early-exit run is swept with its exit rule on its calibration "
                         "split: --rule, --start_budget and --calibrate_on_dev are for SHARCS runs")
  run = exit_budgets.open_exit_run(FLAGS.workdir, runtime=FLAGS.runtime,
                                   precision=FLAGS.precision, limit=FLAGS.limit)
  signal = FLAGS.signal if FLAGS["signal"].present else "entropy"
  data = exit_budgets.serve_budgets(run, FLAGS.budgets, signal=signal, rounds=FLAGS.rounds)
  data["rule"] = "exit"
  metrics = run.task.metrics
  rows = [[name, p["calibration_reduction"], *(100 * p[m] for m in metrics), p["gflops_per_example"],
           p["dev_reduction"], p["mean_exit_layer"], p["examples_per_second"]]
          for name, p in data["paths"].items()]
  rows += [[budget, "out of reach", *("" for _ in metrics), "", "", "", ""]
           for budget in data["out_of_reach"]]
  rows += [[f"{e['exit']} alone", "", *(100 * e[m] for m in metrics), e["gflops"],
            e["dev_reduction"], "", ""] for e in data["exits"]]
  name = f"pareto_{run.task.name}_exit"
  notes = (f"{run.task.name} dev ({data['examples']} examples), an early-exit run "
           f"({data['exit_pooling']} pooling): its {signal} rule calibrated on "
           f"{data['calibration_examples']} held-out training examples, served by the exit engine "
           f"({data['runtime']} {data['precision']}), median of {FLAGS.rounds} passes; each exit "
           f"alone below. CPU: {common.cpu_line(data['cpu'])}.")
  columns = [m if m == "accuracy" else m.upper() for m in metrics]
  common.write_outputs(FLAGS.out, name, data, f"{run.task.name}: accuracy to a budget (early "
                       "exit)", ["budget", "reduction on calibration", *(f"dev {c}" for c in columns),
                                 "dev GFLOPs/example", "dev reduction", "mean exit layer",
                                 "engine examples/s"], rows, notes)
  plot_exits(os.path.join(FLAGS.out, f"{name}.png"), data)
  print(open(os.path.join(FLAGS.out, f"{name}.md")).read())


def plot_exits(path: str, data: dict) -> None:
  paths = [(name, p) for name, p in data["paths"].items() if name != exit_budgets.FULL_DEPTH]
  fig, ax = common.report.pyplot().subplots(figsize=(6, 4))
  ax.plot([p["dev_reduction"] for _, p in paths], [100 * p["accuracy"] for _, p in paths], "o-",
          color="tab:red", label=f"served, {data['signal']} rule calibrated to each budget")
  for name, p in paths:
    ax.annotate(f"{name}\n{p['examples_per_second']:.0f}/s",
                (p["dev_reduction"], 100 * p["accuracy"]), textcoords="offset points",
                xytext=(3, 4), fontsize=7)
  exits = data["exits"]
  ax.plot([e["dev_reduction"] for e in exits], [100 * e["accuracy"] for e in exits], "s",
          color="tab:blue", label="each exit alone (same weights)")
  common.save_accuracy_plot(fig, ax, f"{data['task']}: early exit to a FLOPs budget", path,
                           "full depth")


def plot(path: str, data: dict) -> None:
  met = [b for b in data["budgets"] if "dev" in b]
  fig, ax = common.report.pyplot().subplots(figsize=(6, 4))
  xs = [b["dev"]["flops_reduction"] for b in met]
  ax.plot(xs, [100 * b["dev"]["accuracy"] for b in met], "o-", color="tab:red",
          label=f"SHARCS, {data.get('rule', 'router')} rule (calibrated on "
                f"{data['calibration_source']})")
  for b, x in zip(met, xs):
    ax.annotate(f"{b['budget']}\n{b['examples_per_second']:.0f}/s", (x, 100 * b["dev"]["accuracy"]),
                textcoords="offset points", xytext=(3, 4), fontsize=7)
  full = data["full_width"]
  static = data["static"]
  ax.plot([full["gflops"] / static[w]["gflops"] for w in static],
          [100 * static[w]["accuracy"] for w in static], "s", color="tab:blue",
          label="fixed width (same weights)")
  common.plot_width_mixture(ax, [(s["gflops"], 100 * s["accuracy"]) for s in static.values()],
                            full["gflops"], "tab:blue")
  a = data["router_argmax"]
  ax.plot([a["flops_reduction"]], [100 * a["accuracy"]], "P", color="tab:orange", markersize=10,
          label="router argmax (paper)")
  common.save_accuracy_plot(fig, ax, f"{data['task']}: accuracy to a FLOPs budget", path)


if __name__ == "__main__":
  app.run(main)
