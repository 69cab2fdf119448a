"""Accuracy against FLOPs: SHARCS and the paper's baselines, trained alike on one task.

Every run starts from the same config (backbone, data, held-back rows, epochs, optimiser,
schedule); only the method differs:
  - SHARCS, two-bucket ranges {narrow: [t, 1], full: [0, t]} for each t, router argmax (the paper);
  - SHARCS at other router layers K (t = the config's), and with the entropy hardness signal;
  - SHARCS trained with the paper's recipe (one width a batch, no distillation), where the
    config's recipe differs (sandwich, distillation);
  - SHARCS with the budget rule and with the cascade (--rules): the SHARCS models at the config's
    t (each K, and the entropy hardness model) routed to several FLOPs targets, calibrated on the
    held-back training examples (no retraining), and so too SHARCS runs trained elsewhere on the
    same task (--with_runs, e.g. the main job's workdir);
  - static width after layer K (no router) at every width of the config, trained only at it;
  - early exit: an exit after every layer, DeeBERT's entropy threshold and PABEE's patience, with
    exits on [CLS] as the papers have them and on the mean over tokens (a stronger baseline).
Runs live in OUT/runs/NAME and resume (or are skipped once finished) when the command is run
again. Writes OUT/tradeoff_TASK.{json,md,png}.

    python -m benchmarks.tradeoff --config=configs/mrpc.py --out=/tmp/tradeoff_mrpc
    python -m benchmarks.tradeoff --config=configs/qqp.py --out=DIR --config.data.train_limit=8000
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import common
from sharcs_jax import config as config_lib
from sharcs_jax import evaluate
from sharcs_jax.data import batching
from sharcs_jax.model.widths import width_label
from sharcs_jax.serve import routing
from sharcs_jax.train import loop as train
from sharcs_jax.checkpoint import quiet_orbax_logging
from sharcs_jax.serve.engine import Engine
from sharcs_jax.run import load_run
from sharcs_jax.baselines.train_early_exit import train_early_exit
from sharcs_jax.errors import one_line_errors

config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/qqp.py (two "
                                "widths); --config.section.key=value changes every run's config.",
                                lock_config=True)
flags.mark_flag_as_required("config")
common.define_flags("out", "budgets", "rules", required=("out",),
                    budgets=["1.5x", "2x", "2.5x", "3x"], rules=["router", "cascade"])
flags.DEFINE_list("thresholds", ["0.3", "0.5", "0.7", "0.9"], "Two-bucket thresholds t.")
flags.DEFINE_list("router_layers", [], "Other router layers K to train at the config's t.")
flags.DEFINE_list("with_runs", [], "Finished SHARCS workdirs of the same task and backbone "
                  "trained elsewhere (e.g. the main job's), routed to --budgets beside the sweep.")
flags.DEFINE_list("only", [], "Run only these methods (sharcs, router_layer, entropy, "
                  "paper_recipe, static, early_exit, early_exit_mean); default all.")
FLAGS = flags.FLAGS

METHODS = ("sharcs", "router_layer", "entropy", "paper_recipe", "static", "early_exit",
           "early_exit_mean")
EXIT_RUNS = {"early_exit": ("cls", "early exit"), "early_exit_mean": ("mean", "early exit mean-pool")}


def config_file() -> str:
  return config_flags.get_config_filename(FLAGS["config"])


def overrides() -> list[str]:
  """The command line's --config.* overrides, as section.key=value, for the report."""
  return [f"{field}={value!r}"
          for field, value in config_flags.get_override_values(FLAGS["config"]).items()]


def base_config():
  config = FLAGS.config.copy_and_resolve_references()
  if len(config.model.widths) != 2:
    raise app.UsageError(f"{config_file()}: the two-bucket sweep needs two widths, the config "
                         f"has {tuple(config.model.widths)}")
  if not config.routing.calibration_examples:
    raise app.UsageError(f"{config_file()}: hold back training examples "
                         "(routing.calibration_examples) so the budget rule can be calibrated")
  config.train.progress_bar = False
  return config


def run_name(k: int, t: float, signal: str = "confidence", paper: bool = False) -> str:
  return (f"sharcs_{'entropy_' if signal == 'entropy' else ''}K{k}_t{t:g}"
          f"{'_paper_recipe' if paper else ''}")


def paper_recipe(config) -> bool:
  """Whether the config trains as the paper does (then there is no separate paper-recipe run)."""
  return not config.train.sandwich and config.train.distill == "none"


def sharcs_runs(config) -> dict[str, tuple[str, float, object]]:
  """name -> (method, setting, config) of every training run the sweep needs."""
  t_default = float(config.hardness.ranges[0][0])
  k_default = config.model.router_layer

  def variant(t: float, k: int, signal: str = "confidence", static: float = 0.0,
              paper: bool = False):
    c = config.copy_and_resolve_references()
    c.model.method = "sharcs"  # a task's config may serve the early exit (configs/sst2.py)
    c.hardness.ranges = ((t, 1.0), (0.0, t))
    c.model.router_layer, c.hardness.signal, c.train.static_width = k, signal, static
    # the router's argmax, as the paper routes; budgets and rules are applied after training
    c.routing.budget, c.routing.rule, c.routing.start_budget = "", "router", ""
    if static or paper:  # a static width has no teacher; the paper trains one width a batch
      c.train.sandwich, c.train.distill = False, "none"
    return c

  runs = {}  # in the order they train: baselines first, then SHARCS at the config's t first
  if "static" in methods():
    for w in config.model.widths:
      runs[f"static_w{width_label(w)}"] = ("static", float(w), variant(t_default, k_default, static=w))
  if "sharcs" in methods():
    for t in [t_default] + sorted(set(map(float, FLAGS.thresholds)) - {t_default}):
      runs[run_name(k_default, t)] = ("sharcs", t, variant(t, k_default))
  if "router_layer" in methods():
    for k in map(int, FLAGS.router_layers):
      runs[run_name(k, t_default)] = (f"sharcs K={k}", t_default, variant(t_default, k))
  if "entropy" in methods():
    runs[run_name(k_default, t_default, "entropy")] = (
        "sharcs entropy", t_default, variant(t_default, k_default, "entropy"))
  if "paper_recipe" in methods() and not paper_recipe(config):
    runs[run_name(k_default, t_default, paper=True)] = (
        "sharcs paper recipe", t_default, variant(t_default, k_default, paper=True))
  return runs


def methods() -> tuple[str, ...]:
  unknown = set(FLAGS.only) - set(METHODS)
  if unknown:
    raise app.UsageError(f"--only: unknown methods {sorted(unknown)}; known: {METHODS}")
  return tuple(FLAGS.only) or METHODS


def run_or_load(name: str, config, out: str) -> dict:
  workdir = os.path.join(out, "runs", name)
  report_path = os.path.join(workdir, "report.json")
  if os.path.exists(report_path):
    logging.info("%s: finished earlier, reading %s", name, report_path)
    return json.load(open(report_path))
  start = time.time()
  summary = train.train_and_evaluate(config, workdir)
  logging.info("%s: trained and evaluated in %.1f min", name, (time.time() - start) / 60)
  return summary


@dataclasses.dataclass(frozen=True)
class BudgetSweep:
  """A trained SHARCS run's dev predictions at every width and its router on a calibration split.

  Every budget of a sweep is one calibration and one summary over these arrays, so the model runs
  once per split however many budgets and rules are asked for.
  """
  engine: Engine
  dev: batching.Encoded
  calibration_router: np.ndarray
  calibration_flops: np.ndarray
  calibration_probabilities: np.ndarray  # [m, N, C]: what a cascade is calibrated on
  calibration_prefix_flops: np.ndarray  # [N]
  dev_probabilities: np.ndarray
  dev_router: np.ndarray

  @classmethod
  def build(cls, engine: Engine, dev: batching.Encoded,
            calibration: batching.Encoded) -> "BudgetSweep":
    params, batch = engine.variables["params"], engine.batch_buckets[-1]
    probabilities, dev_router = evaluate.predict_all_widths(engine.programs, params, dev, batch,
                                                            engine.runner)
    calibration_probabilities, calibration_router = evaluate.predict_all_widths(
        engine.programs, params, calibration, batch, engine.runner)
    return cls(engine, dev, calibration_router,
               evaluate.per_example_flops(engine.flops, calibration), calibration_probabilities,
               engine.prefix_flops[calibration.bucket_of], probabilities, dev_router)

  def at_budget(self, budget: routing.Budget, rule: str = "router"
                ) -> tuple[routing.Rule | routing.Cascade, dict]:
    """The rule named `rule` calibrated to `budget` and its routed dev metrics; ValueError if out
    of reach."""
    calibrated = routing.calibrate_rule(rule, budget, self.calibration_router,
                                        self.calibration_flops, self.calibration_probabilities,
                                        self.calibration_prefix_flops)
    summary = evaluate.summarize(self.dev_probabilities, self.dev_router, self.dev,
                                 self.engine.flops, self.engine.task.metrics, calibrated,
                                 self.engine.prefix_flops)
    return calibrated, summary["sharcs"]


def budget_points(workdir: str, eval_batch: int) -> list[dict]:
  """The trained SHARCS model routed to each target of --budgets (held-out calibration)."""
  run = load_run(workdir)
  engine = Engine.from_run(run, batch_buckets=(1, eval_batch))  # training's programs
  dev, calibration = run.encoded("dev", "calibration")
  sweep = BudgetSweep.build(engine, dev, calibration)
  points = []
  for rule_name in FLAGS.rules:
    for spec in FLAGS.budgets:
      try:
        rule, result = sweep.at_budget(routing.parse_budget(spec), rule_name)
      except ValueError as e:
        points.append({"rule": rule_name, "budget": spec, "error": str(e)})
        continue
      points.append({"rule": rule_name, "budget": spec,
                     "calibration_reduction": rule.calibration_reduction, **result})
  return points


def other_runs(config) -> dict[str, dict]:
  """workdir -> report of each --with_runs run, checked before anything trains."""
  reports = {}
  for workdir in FLAGS.with_runs:
    path = os.path.join(workdir, "report.json")
    if not os.path.exists(path):
      raise app.UsageError(f"--with_runs: {workdir} holds no finished run (no report.json)")
    report = json.load(open(path))
    theirs, ours = (report["task"], report["model"]), (config.task, config.model.backbone)
    if theirs != ours:
      raise app.UsageError(f"--with_runs: {path} is a run of (task, backbone) {theirs}; this "
                           f"sweep's are {ours}")
    reports[workdir] = report
  return reports


def routed_runs(config, out: str, others: dict[str, dict]) -> list[tuple[str, str, str]]:
  """(method, run, workdir) of every trained SHARCS model that --budgets routes: the sweep's at
  the config's t (each K, then the entropy hardness model), then `others`, the --with_runs
  reports (named by their directory)."""
  def method(k: int) -> str:
    return "sharcs budget rule" if k == config.model.router_layer else f"sharcs K={k} budget rule"

  t_default = float(config.hardness.ranges[0][0])
  ks = [config.model.router_layer] if "sharcs" in methods() else []
  if "router_layer" in methods():
    ks += [int(k) for k in FLAGS.router_layers]
  named = [(method(k), run_name(k, t_default)) for k in ks]
  if "entropy" in methods():
    named.append(("sharcs entropy budget rule",
                  run_name(config.model.router_layer, t_default, "entropy")))
  if "paper_recipe" in methods() and not paper_recipe(config):
    named.append(("sharcs paper recipe budget rule",
                  run_name(config.model.router_layer, t_default, paper=True)))
  runs = [(method, name, os.path.join(out, "runs", name)) for method, name in named]
  for workdir, report in others.items():
    name = os.path.basename(os.path.normpath(workdir))
    runs.append((f"{method(report['router_layer'])} ({name})", name, workdir))
  return runs


def collect(config, out: str, others: dict[str, dict]) -> dict:
  """Trains (or reads) every run; one record per point of the trade-off."""
  points, reference = [], None
  for name, (pooling, label) in EXIT_RUNS.items():
    if name not in methods():
      continue
    workdir = os.path.join(out, "runs", name)
    path = os.path.join(workdir, "early_exit.json")
    exit_config = config.copy_and_resolve_references()
    exit_config.model.exit_pooling = pooling
    summary = (json.load(open(path)) if os.path.exists(path)
               else train_early_exit(exit_config, workdir))
    for p in summary["points"]:
      rule = "DeeBERT entropy" if p["rule"] == "entropy" else "PABEE"
      points.append({"method": f"{label} ({rule})", "setting": p["setting"], "run": name,
                     "best_epoch": summary["best_epoch"], **_metrics(p)})
  for name, (method, setting, run_config) in sharcs_runs(config).items():
    summary = run_or_load(name, run_config, out)
    reference = reference or summary["full_width"]["gflops"]
    if method == "static":
      result = summary["static"][width_label(setting)]
    else:
      result = summary["sharcs"]
    points.append({"method": method, "setting": setting, "run": name,
                   "best_epoch": summary["best_epoch"], "full_width_accuracy":
                   summary["full_width"]["accuracy"], **_metrics(result)})
  for method, run, workdir in routed_runs(config, out, others):
    for p in budget_points(workdir, config.eval.batch_size):
      named = method.replace("budget rule", p["rule"]) if p["rule"] != "router" else method
      if "error" in p:
        points.append({"method": named, "setting": p["budget"], "error": p["error"]})
      else:
        points.append({"method": named, "setting": p["budget"], "run": run,
                       "calibration_reduction": p["calibration_reduction"], **_metrics(p)})
  reference = reference or next(
      (report["full_width"]["gflops"] for report in others.values()), None)
  if reference is None:
    raise app.UsageError("--only must include a SHARCS or static run, or --with_runs must name "
                         "one: they give the full-width GFLOPs that reductions are measured "
                         "against")
  for p in points:
    if "gflops" in p:
      p["flops_reduction"] = reference / p["gflops"]
  return {"task": config.task, "model": config.model.backbone, "config": config_file(),
          "overrides": overrides(), "full_width_gflops": reference, "points": points}


def _metrics(result: dict) -> dict:
  return {k: result[k] for k in ("accuracy", "f1", "gflops", "share_per_width") if k in result}


def write(data: dict, out: str) -> None:
  task = data["task"]
  has_f1 = any("f1" in p for p in data["points"])
  rows = []
  for p in data["points"]:
    if "error" in p:
      rows.append([p["method"], p["setting"], p["error"]] + [""] * (2 + has_f1))
      continue
    rows.append([p["method"], p["setting"], 100 * p["accuracy"]]
                + ([100 * p["f1"] if "f1" in p else ""] if has_f1 else [])
                + [p["gflops"], p["flops_reduction"]])
  header = ["method", "setting", "dev accuracy"] + (["dev F1"] if has_f1 else []) + [
      "GFLOPs/example", "reduction"]
  notes = (f"{task} dev, {data['model']}, every run trained from `{data['config']}`"
           f"{' with ' + ', '.join(data['overrides']) if data['overrides'] else ''}. "
           f"Reductions against the full width ({data['full_width_gflops']:.3f} GFLOPs/example, "
           "XLA cost analysis at each example's length bucket).")
  common.write_outputs(out, f"tradeoff_{task}", data, f"{task}: accuracy against FLOPs",
                       header, rows, notes)
  plot(os.path.join(out, f"tradeoff_{task}.png"), data)


STYLES = {"sharcs": ("o-", "tab:red"), "sharcs budget rule": ("*-", "darkred"),
          "sharcs K=1 budget rule": ("*:", "salmon"),
          "sharcs cascade": ("X-", "black"), "sharcs K=1 cascade": ("X:", "dimgray"),
          "sharcs entropy cascade": ("X--", "tab:pink"),
          "sharcs entropy": ("D", "tab:purple"),
          "sharcs entropy budget rule": ("*--", "tab:purple"), "static": ("s", "tab:blue"),
          "sharcs paper recipe": ("o", "tab:orange"),
          "sharcs paper recipe budget rule": ("*-.", "tab:orange"),
          "sharcs paper recipe cascade": ("X-.", "tab:orange"),
          "early exit (DeeBERT entropy)": ("^-", "tab:green"),
          "early exit (PABEE)": ("v-", "tab:olive"),
          "early exit mean-pool (DeeBERT entropy)": ("^--", "tab:cyan"),
          "early exit mean-pool (PABEE)": ("v--", "tab:gray")}


def plot(path: str, data: dict) -> None:
  fig, ax = common.report.pyplot().subplots(figsize=(7, 4.8))
  by_method: dict[str, list[dict]] = {}
  for p in data["points"]:
    if "gflops" in p:
      by_method.setdefault(p["method"], []).append(p)
  for method, points in by_method.items():
    points = sorted(points, key=lambda p: p["flops_reduction"])
    # A --with_runs run, "sharcs budget rule (DIR)", is drawn as its kind.
    style, color = STYLES.get(method, STYLES.get(method.split(" (")[0], ("P", "tab:orange")))
    label = {"sharcs": "SHARCS, t sweep (router argmax)"}.get(method, method)
    if method == "static":  # markers only in STYLES: the mixture joins them
      common.plot_width_mixture(ax, [(p["gflops"], 100 * p["accuracy"]) for p in points],
                                data["full_width_gflops"], color)
    ax.plot([p["flops_reduction"] for p in points], [100 * p["accuracy"] for p in points], style,
            color=color, label=label, markersize=7 if "*" not in style else 11)
    if method == "sharcs" or method == "static" or "budget rule" in method or "cascade" in method:
      for p in points:
        ax.annotate(f"{p['setting']:g}" if isinstance(p["setting"], float) else p["setting"],
                    (p["flops_reduction"], 100 * p["accuracy"]), textcoords="offset points",
                    xytext=(3, 3), fontsize=7, color=color)
  common.save_accuracy_plot(fig, ax, f"{data['task']} / {data['model']}: accuracy against FLOPs",
                           path)


def main(argv):
  del argv
  quiet_orbax_logging()
  config = base_config()
  config_lib.validate(config)
  others = other_runs(config)  # a mistyped --with_runs fails now, not after hours of training
  data = collect(config, FLAGS.out, others)
  write(data, FLAGS.out)
  print(open(os.path.join(FLAGS.out, f"tradeoff_{data['task']}.md")).read())


if __name__ == "__main__":
  app.run(one_line_errors(main), flags_parser=config_lib.parse_flags)
