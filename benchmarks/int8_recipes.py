"""Which int8 recipe to serve: every width's dev accuracy and the full width's speed per recipe.

    python -m benchmarks.int8_recipes --workdir=/tmp/sharcs_qqp --out=/tmp/bench [--limit=0]

The run's programs on ONNX Runtime at fp32 and under each int8 recipe (`onnx_programs.Int8Recipe`):
dynamic quantisation with per-channel weights (the default), with per-tensor weights, static QDQ
quantisation calibrated on the run's held-out calibration split, and dynamic per-channel after
onnxruntime.transformers' BERT fusions. Accuracy per width comes from one pass with every row at
every width (the dispatch core, as dev evaluation runs); speed is token ids to labels at full
width (batch buckets up to 32), interleaved rounds in one process, medians. Writes
int8_recipes.{json,md,png} into --out.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from benchmarks import common
from sharcs_jax import report
from sharcs_jax.checkpoint import quiet_orbax_logging
from sharcs_jax.model.widths import width_label
from sharcs_jax.run import load_run
from sharcs_jax.serve import dispatch, evaluate, routing
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.onnx_programs import Int8Recipe, OnnxPrograms

flags.DEFINE_string("workdir", None, "A trained run.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("rounds", 3, "Interleaved timed passes over dev per recipe.")
flags.DEFINE_integer("limit", 0, "> 0: only the first N dev examples.")
FLAGS = flags.FLAGS

RECIPES = {
    "fp32": None,
    "int8 dynamic, per-channel weights (default)": Int8Recipe(),
    "int8 dynamic, per-tensor weights": Int8Recipe(per_channel=False),
    "int8 static QDQ, calibrated, per-channel": Int8Recipe(method="static"),
    "int8 dynamic per-channel after BERT fusions": Int8Recipe(bert_fusions=True),
    "int8 dynamic per-tensor after BERT fusions": Int8Recipe(per_channel=False, bert_fusions=True),
}


def main(argv):
  del argv
  quiet_orbax_logging()
  run = load_run(FLAGS.workdir)
  engine = Engine.from_run(run)  # XLA fp32: the FLOPs table and the model's shapes
  (dev,) = run.encoded("dev", limit=FLAGS.limit)
  (calibration,) = run.encoded("calibration")
  rows_for_calibration = (calibration.input_ids, calibration.token_type_ids, calibration.lengths)
  runners, sizes = {}, {}
  for name, recipe in RECIPES.items():
    programs = OnnxPrograms(engine.model, engine.params["params"],
                            precision="fp32" if recipe is None else "int8",
                            cache_dir=os.path.join(run.workdir, "executables"),
                            recipe=recipe or Int8Recipe(), calibration=rows_for_calibration)
    runners[name] = programs.runner()
    sizes[name] = sum(os.path.getsize(p) for p in programs.paths.values()) / 2**20
  full = len(engine.widths) - 1

  def full_width_pass(runner):
    return dispatch.run_buckets(
        runner, dev.input_ids, dev.token_type_ids, dev.lengths,
        length_buckets=engine.length_buckets, batch_buckets=engine.batch_sizes,
        program_lengths=engine.program_lengths,
        num_widths=len(engine.widths), num_classes=engine.model.num_classes,
        rule=routing.Fixed(full), width_flops=engine.flops, prefix_flops=engine.prefix_flops)

  times = common.time_side_by_side({n: (lambda r=r: full_width_pass(r)) for n, r in
                                    runners.items()}, FLAGS.rounds, warmup=1)
  reference = None
  results = {}
  for name, runner in runners.items():
    probabilities, _ = evaluate.predict_all_widths(engine.programs, engine.params["params"], dev,
                                                   engine.batch_buckets[-1], runner)
    reference = probabilities if reference is None else reference
    median = float(np.median(times[name]))
    results[name] = {
        "recipe": None if RECIPES[name] is None else vars(RECIPES[name]),
        "examples_per_second": len(dev) / median, "median_seconds": median,
        "seconds": times[name].tolist(),
        "per_width": {width_label(w): {
            **evaluate.classification_metrics(probabilities[i].argmax(-1), dev.labels,
                                              run.task.metrics),
            "agreement_with_fp32": float(np.mean(probabilities[i].argmax(-1)
                                                 == reference[i].argmax(-1))),
            "max_abs_probability_difference_vs_fp32": float(
                np.abs(probabilities[i] - reference[i]).max())}
            for i, w in enumerate(engine.widths)},
        "model_mb": sizes[name]}
  data = {"task": run.task.name, "workdir": FLAGS.workdir, "examples": len(dev),
          "rounds": FLAGS.rounds, "cpu": common.cpu_info(), "recipes": results,
          "calibration_examples": len(calibration)}
  write(data, engine.widths)


def write(data: dict, widths) -> None:
  header = ["recipe", "full width examples/s", "MB"] + [
      f"accuracy w={width_label(w)} (%)" for w in widths] + [
      f"same label as fp32 w={width_label(w)} (%)" for w in widths]
  rows = [[name, r["examples_per_second"], r["model_mb"]]
          + [100 * r["per_width"][width_label(w)]["accuracy"] for w in widths]
          + [100 * r["per_width"][width_label(w)]["agreement_with_fp32"] for w in widths]
          for name, r in data["recipes"].items()]
  notes = (f"{data['examples']} {data['task']} dev examples; speed: token ids to labels at full "
           f"width, median of {data['rounds']} interleaved passes; static QDQ calibrated on "
           f"{data['calibration_examples']} held-out training examples (at most 512 per length "
           f"bucket). CPU: {common.cpu_line(data['cpu'])}.")
  common.write_outputs(FLAGS.out, "int8_recipes", data, f"{data['task'].upper()}: int8 recipes "
                       "on ONNX Runtime", header, rows, notes)
  fig, ax = report.pyplot().subplots(figsize=(8, 3.5))
  names = list(data["recipes"])
  bars = ax.barh(names, [data["recipes"][n]["examples_per_second"] for n in names])
  for bar, name in zip(bars, names):
    full = data["recipes"][name]["per_width"][width_label(widths[-1])]["accuracy"]
    ax.annotate(f" full width {100 * full:.2f}%", (bar.get_width(),
                                                   bar.get_y() + bar.get_height() / 2),
                va="center", fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("full-width examples / s (token ids to labels)")
  ax.set_title(f"{data['task']} dev, {data['cpu']['model']}", fontsize=9)
  report.save_figure(fig, os.path.join(FLAGS.out, "int8_recipes.png"), dpi=110)
  print(open(os.path.join(FLAGS.out, "int8_recipes.md")).read())


if __name__ == "__main__":
  app.run(main)
