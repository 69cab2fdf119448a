"""The engine served: its budgets against its own whole model, and against stock CPU stacks.

One code path for a SHARCS and an early-exit run: the engine over every route of the run in
--workdir, its rule calibrated to each budget on the run's held-out training examples (never on
dev), beside the whole model as one program (SHARCS: the full width, no router; an early exit:
every layer and the last exit). Three modes:

    python -m benchmarks.serving --mode=stacks --workdir=W --out=O [--budgets=1.5x,2x,2.5x] \
        [--rules=cascade] [--runtimes=xla,onnxruntime] [--precisions=fp32,auto] [--rounds=3]
    python -m benchmarks.serving --mode=budgets --workdir=W --out=O [--budgets=1x,...,3x,max] \
        [--rules=router] [--runtime=onnxruntime --precision=int8] [--by_length] [--exit_layers=..]
    python -m benchmarks.serving --mode=throughput --workdir=W --out=O [--budgets=2x \
        --rules=cascade] [--precision=auto]

`stacks` (text in, labels out; serving.{json,md,png}, serving_pareto.png): on every runtime and
precision asked, the whole model (`sharcs_jax full width` / `full depth`; on ONNX Runtime a SHARCS
model's full width also through the engine's prefix and full part, `prefix+part full width`) and
the engine at each budget and rule (`sharcs_jax engine 2x cascade`, `sharcs_jax exit engine 2x`),
each runtime calibrated on its own programs' probabilities; beside them the run's Hugging Face
export (where the model has one: [CLS] exits) as `pytorch eager b32` (transformers' SDPA
attention, length-sorted batches of 32), and its `torch.onnx.export` on ONNX Runtime fp32 and
int8 (`quantize_dynamic`), one input at a time (b1) or in sorted batches (b32). Every timed pass
tokenises the texts (the same files and truncation for every path) and ends with probabilities in
input order; speeds are also multiples of the bar, ONNX Runtime int8 of the HF export b32 (where
there is none, int8 of the whole model). torch, onnx and onnxruntime come from the `test` extra.

`budgets` (token ids to labels; pareto_TASK[_RULE].{json,md,png}): the whole model, the engine
at each budget ('max': every row at its cheapest route) and each route alone (a width, an exit),
with the reduction reached on the calibration split and on dev, dev accuracy and examples/s. A
depth-and-width model adds at each budget its full-width exits alone ('2x, depth only'); an
early-exit model's other calibration (one threshold per length bucket, or pooled) is reported
beside each budget from every exit's dev outputs. A budget out of reach is reported with the
reachable range.

`throughput` (token ids to labels; throughput.{json,md,png}): the engine at one budget ('': the
run's own rule: a SHARCS checkpoint's, an early exit's config budget) against the whole model.
"""

from __future__ import annotations

import itertools
import os
import platform
import tempfile
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import common
from sharcs_jax import evaluate
from sharcs_jax import report
from sharcs_jax.checkpoint import quiet_orbax_logging
from sharcs_jax.data import batching
from sharcs_jax.data.padding import length_mask
from sharcs_jax.run import Run, load_run
from sharcs_jax.serve import dispatch, routing
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.export import hf as hf_export
from sharcs_jax.serve.layout import Predictions
from sharcs_jax.serve.precision import PRECISIONS
from sharcs_jax.serve.precision import resolve as resolve_precision
from sharcs_jax.errors import one_line_errors

MODES = {  # each mode's defaults of the shared flags it reads
    "stacks": {"budgets": ["1.5x", "2x", "2.5x"], "rules": ["cascade"]},
    "budgets": {"budgets": ["1x", "1.25x", "1.5x", "1.75x", "2x", "2.25x", "2.5x", "3x", "max"],
                "rules": ["router"]},
    "throughput": {"budgets": [""], "rules": ["router"]},
}
flags.DEFINE_enum("mode", "stacks", list(MODES), "stacks: text in, labels out, against PyTorch and "
                  "ONNX Runtime; budgets: a sweep of budgets; throughput: one budget against the "
                  "whole model.")
common.define_flags("workdir", "out", "rounds", "limit", "runtime", "precision", "runtimes",
                    "precisions", "budgets", "rules", "signal", "threads",
                    required=("workdir", "out"), budgets=None, rules=None)
flags.DEFINE_string("start_budget", "", "SHARCS router+cascade: the router's own budget, e.g. 3x.")
flags.DEFINE_bool("calibrate_on_dev", False, "budgets: calibrate on dev itself (for runs that held "
                  "back no training examples); the dev figures are then not held-out estimates.")
flags.DEFINE_bool("by_length", False, "An early-exit run: one exit threshold per length bucket "
                  "(else one pooled threshold).")
flags.DEFINE_list("exit_layers", [], "An early-exit run, budgets and throughput: the layers "
                  "(1-based) whose exits the rule reads; default all.")
flags.DEFINE_list("batch_buckets", [str(b) for b in dispatch.BATCH_BUCKETS],
                  "budgets and throughput: batch sizes compiled for every path.")
flags.DEFINE_list("hf_batches", ["32"], "stacks: batch sizes of the ONNX Runtime paths of the HF "
                  "export (1: one input at a time; 32: sorted batches).")
FLAGS = flags.FLAGS

BATCH = 32
BAR = f"onnxruntime int8 b{BATCH}"  # the strongest stock path: every speed is also a multiple of it
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "tokenizers", "onnx", "onnxruntime",
            "numpy")

RunBatch = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # ids, mask, types -> logits


def apply_mode_defaults() -> None:
  """The shared flags a mode defaults differently, set to its defaults where not given."""
  for name, default in MODES[FLAGS.mode].items():
    if FLAGS[name].value is None:
      FLAGS[name].value = default


def path_name(budget: str, rule: str) -> str:
  """A budget's path: "2x", or "2x cascade" for a rule other than the default one."""
  return budget + ("" if rule in ("router", common.EXIT_RULE) else f" {rule}")


def calibration_stages(engine: Engine, kind: common.Kind, calibration: batching.Encoded
                       ) -> np.ndarray | None:
  """An early-exit model's every exit on the calibration split, computed once for every budget
  it is calibrated to (a SHARCS rule reads what it needs itself)."""
  return engine.every_stage(calibration) if kind.routes_by_depth else None


def budget_rules(engine: Engine, calibration: batching.Encoded, budgets: Sequence[str],
                 rules: Sequence[str], *, every_stage: np.ndarray | None, signal: str = "",
                 start_budget: str = "", by_length: bool = False, depth_only: bool = False
                 ) -> tuple[dict[str, Any], dict[str, str]]:
  """({path name: rule} calibrated on `calibration` for each budget and rule, {name: why} for
  those out of reach). 'max' is every row at its cheapest route; with `depth_only` a
  depth-and-width model adds each budget's full-width exits alone ("2x, depth only")."""
  most = routing.Budget(reduction=common.most_reduction(engine, calibration))
  found, out_of_reach = {}, {}
  for budget, rule in itertools.product(budgets, rules):
    name = path_name(budget, rule)
    calibrate = lambda **options: common.calibrated(
        engine, most if budget == "max" else budget, calibration, rule, signal,
        start_budget=start_budget, every_stage=every_stage, **options)
    try:
      found[name] = calibrate(by_length=by_length)
      if depth_only and engine.narrow_count:
        found[f"{name}, depth only"] = calibrate(narrow=False)
    except ValueError as e:
      logging.warning("%s: %s", name, e)
      out_of_reach[name] = str(e)
  return found, out_of_reach


def timed_predictions(runs: dict[str, Callable[[], Predictions]], rounds: int
                      ) -> dict[str, tuple[Predictions, np.ndarray]]:
  """Each path's predictions from its last pass and its seconds per pass, in interleaved
  rounds."""
  outputs = {}
  candidates = {name: (lambda name=name: outputs.__setitem__(name, runs[name]())) for name in runs}
  times = common.time_side_by_side(candidates, rounds, warmup=1)
  return {name: (outputs[name], times[name]) for name in runs}


def path_figures(kind: common.Kind, engine: Engine, dev: batching.Encoded,
                 predictions: Predictions, seconds: np.ndarray, full_gflops: float,
                 rule: Any = None) -> dict:
  """A timed path's dev figures: speed, FLOPs, reduction (on calibration and dev), metrics and
  where its rows went."""
  gflops = float(predictions.gflops.mean())
  return {"seconds": seconds.tolist(), "examples_per_second": len(dev) / float(np.median(seconds)),
          "gflops_per_example": gflops, "dev_reduction": full_gflops / gflops,
          "calibration_reduction": rule.calibration_reduction if rule is not None else 1.0,
          **({"rule": rule.to_json()} if rule is not None else {}),
          **common.classification(predictions.labels, dev, engine.task.metrics),
          **kind.route_figures(predictions, engine.route_names())}


def served_paths(engine: Engine, kind: common.Kind, dev: batching.Encoded, rules: dict[str, Any],
                 rounds: int) -> dict[str, dict]:
  """The whole model (first) and the engine under each rule, timed side by side on dev; each
  path's speed-up over the whole model."""
  full = kind.full_program(engine, common.threads())
  runs = {kind.full: lambda: common.full_predictions(engine, full(dev), dev)}
  runs |= {name: (lambda routed=engine.with_rule(rule): routed.run(dev))
           for name, rule in rules.items()}
  print(f"{len(dev)} {engine.task.name} dev examples, {len(runs)} paths, {rounds} rounds",
        flush=True)
  timed = timed_predictions(runs, rounds)
  full_gflops = float(engine.full_gflops(dev).mean())
  paths = {name: path_figures(kind, engine, dev, predictions, seconds, full_gflops,
                              rules.get(name))
           for name, (predictions, seconds) in timed.items()}
  for path in paths.values():
    path["speedup"] = path["examples_per_second"] / paths[kind.full]["examples_per_second"]
  return paths


def routes_alone(engine: Engine, dev: batching.Encoded, every_stage: np.ndarray) -> list[dict]:
  """Each route alone on dev (a width, an exit): every row answered there, same weights."""
  costs = common.route_costs(engine, dev).mean(1)
  full = float(engine.full_gflops(dev).mean())
  return [{"route": name, "gflops": float(g), "dev_reduction": full / float(g),
           **common.classification(p.argmax(-1), dev, engine.task.metrics)}
          for name, g, p in zip(engine.route_names(), costs, every_stage)]


def other_calibration(engine: Engine, calibration: batching.Encoded, dev: batching.Encoded,
                      calibration_stages: np.ndarray, dev_stages: np.ndarray,
                      rules: dict[str, Any], signal: str, by_length: bool) -> dict[str, float]:
  """An early-exit model's dev reduction at each budget had it been calibrated the other way (per
  length bucket, or pooled), from every exit's dev outputs: what --by_length would change."""
  stage_flops = engine.stage_flops[:, dev.bucket_of].T
  other = {}
  for name, rule in rules.items():
    unserved = engine.calibrate(rule.budget, calibration, signal=signal, by_length=not by_length,
                                every_stage=calibration_stages)
    other[name] = routing.exit_reduction(unserved, dev_stages, stage_flops, dev.bucket_of)
  return other


def opened(run: Run) -> tuple[Engine, common.Kind]:
  """budgets and throughput: the run's engine on --runtime and --precision, and its kind."""
  engine = common.open_engine(
      run, runtime=FLAGS.runtime, precision=FLAGS.precision, threads=FLAGS.threads,
      batch_buckets=tuple(int(b) for b in FLAGS.batch_buckets),
      exit_layers=[int(layer) for layer in FLAGS.exit_layers] or None)
  return engine, common.kind_of(engine)


def budgets_main(run: Run) -> None:
  engine, kind = opened(run)
  rules = common.checked_rules(kind, "rules")
  budgets = common.checked_budgets(FLAGS.budgets, special=("max",))
  (dev,) = run.encoded("dev", limit=FLAGS.limit)
  calibration = dev if FLAGS.calibrate_on_dev else common.calibration_data(run)
  source = "dev itself" if FLAGS.calibrate_on_dev else "held-out training examples"
  stages = calibration_stages(engine, kind, calibration)
  found, out_of_reach = budget_rules(engine, calibration, budgets, rules, every_stage=stages,
                                     signal=FLAGS.signal, start_budget=FLAGS.start_budget,
                                     by_length=FLAGS.by_length, depth_only=True)
  paths = served_paths(engine, kind, dev, found, FLAGS.rounds)
  every_stage = engine.every_stage(dev)
  if kind.routes_by_depth and not engine.narrow_count:
    for name, reduction in other_calibration(engine, calibration, dev, stages, every_stage, found,
                                             FLAGS.signal, FLAGS.by_length).items():
      paths[name]["dev_reduction_other_calibration"] = reduction
  data = {"task": run.task.name, "workdir": run.workdir, "model": kind.model,
          **kind.describe(engine), "rule": "+".join(rules), "rules": rules,
          "signal": FLAGS.signal or kind.signal, "start_budget": FLAGS.start_budget,
          "runtime": engine.runtime, "precision": engine.precision, "rounds": FLAGS.rounds,
          "examples": len(dev), "calibration_examples": len(calibration),
          "calibration_source": source,
          "calibration": "per length bucket" if FLAGS.by_length else "pooled",
          "reachable_reductions": [1.0, common.most_reduction(engine, calibration)],
          "full_gflops": float(engine.full_gflops(dev).mean()), "cpu": common.cpu_info(),
          "full": kind.full, "paths": paths, "out_of_reach": out_of_reach,
          "alone": routes_alone(engine, dev, every_stage)}
  name = f"pareto_{run.task.name}" + ("" if rules == ["router"] else
                                       "_" + "_".join(r.replace("+", "_") for r in rules))
  write_budgets(FLAGS.out, name, data, kind, engine.task.metrics)


def write_budgets(out: str, name: str, data: dict, kind: common.Kind,
                  metrics: Sequence[str]) -> None:
  other = any("dev_reduction_other_calibration" in p for p in data["paths"].values())
  rows = [[path, p["calibration_reduction"], p["dev_reduction"],
           *([p.get("dev_reduction_other_calibration", "")] if other else []),
           *(100 * p[m] for m in metrics), p["gflops_per_example"], p["examples_per_second"],
           p["speedup"], common.shares_line(p[kind.share_key])]
          for path, p in data["paths"].items()]
  blank = ["" for _ in range(5 + other + len(metrics))]
  rows += [[path, "out of reach", *blank] for path in data["out_of_reach"]]
  rows += [[f"{a['route']} alone", "", a["dev_reduction"], *([""] if other else []),
            *(100 * a[m] for m in metrics), a["gflops"], "", "", ""] for a in data["alone"]]
  reach = data["reachable_reductions"]
  notes = (f"{data['task']} dev ({data['examples']} examples), token ids to labels, "
           f"{data['runtime']} {data['precision']}; the {data['rule']} rule ({data['signal']}) "
           f"calibrated {data['calibration']} to each budget on {data['calibration_examples']} "
           f"{data['calibration_source']} (reachable reductions {reach[0]:g}x to "
           f"{reach[1]:.2f}x), beside the {kind.full} as one program "
           f"({data['full_gflops']:.4f} GFLOPs/example) and each route alone (same weights)"
           + ("; the other calibration's dev reduction beside each budget" if other else "")
           + f". Median of {data['rounds']} interleaved passes; CPU: "
           f"{common.cpu_line(data['cpu'])}.")
  if data["out_of_reach"]:
    notes += " Out of reach: " + "; ".join(f"{k}: {e}" for k, e in data["out_of_reach"].items())
  header = ["path", "reduction (calibration)", "reduction (dev)",
            *(["reduction (dev, other calibration)"] if other else []),
            *(f"dev {c}" for c in common.metric_columns(metrics)), "GFLOPs/example",
            "examples/s", "speed-up", "share per route"]
  common.write_outputs(out, name, data, f"{data['task']}: the {kind.engine} to a budget", header,
                       rows, notes)
  plot_budgets(os.path.join(out, f"{name}.png"), data, kind)
  common.print_report(out, name)


def plot_budgets(path: str, data: dict, kind: common.Kind) -> None:
  """Dev accuracy against the dev reduction: the engine at each budget (with its examples/s),
  each route alone and the mixtures of neighbouring routes a rule must beat."""
  fig, ax = report.pyplot().subplots(figsize=(6, 4))
  served = [(name, p) for name, p in data["paths"].items() if name != kind.full]
  ax.plot([p["dev_reduction"] for _, p in served], [100 * p["accuracy"] for _, p in served],
          "o-", color="tab:red", label=f"{kind.engine}, {data['rule']} rule calibrated to each "
                                       f"budget on {data['calibration_source']}")
  for name, p in served:
    ax.annotate(f"{name}\n{p['examples_per_second']:.0f}/s",
                (p["dev_reduction"], 100 * p["accuracy"]), textcoords="offset points",
                xytext=(3, 4), fontsize=7)
  alone = data["alone"]
  ax.plot([a["dev_reduction"] for a in alone], [100 * a["accuracy"] for a in alone], "s",
          color="tab:blue", label="each route alone (same weights)")
  common.plot_width_mixture(ax, [(a["gflops"], 100 * a["accuracy"]) for a in alone],
                            data["full_gflops"], "tab:blue")
  common.save_accuracy_plot(fig, ax, f"{data['task']}: accuracy to a FLOPs budget", path,
                            kind.full)


def throughput_main(run: Run) -> None:
  engine, kind = opened(run)
  rules = common.checked_rules(kind, "rules")
  if len(rules) > 1:
    raise app.UsageError(f"--rules={','.join(rules)}: throughput times one rule")
  rule_name = rules[0]
  budgets = common.checked_budgets([b for b in FLAGS.budgets if b])
  if len(budgets) > 1:
    raise app.UsageError(f"--budgets={','.join(budgets)}: throughput times one budget")
  if not budgets and rule_name not in ("router", common.EXIT_RULE):
    raise app.UsageError(f"--rules={rule_name} is calibrated to a budget: give --budgets")
  rule = (common.calibrated(engine, budgets[0], common.calibration_data(run), rule_name,
                            FLAGS.signal, start_budget=FLAGS.start_budget,
                            by_length=FLAGS.by_length)
          if budgets else common.own_rule(engine, rule_name, FLAGS.signal))
  (dev,) = run.encoded("dev", limit=FLAGS.limit)
  paths = served_paths(engine, kind, dev, {kind.engine: rule}, FLAGS.rounds)
  served, full = paths[kind.engine], paths[kind.full]
  data = {"task": run.task.name, "workdir": run.workdir, "model": kind.model,
          "examples": len(dev), "batch_buckets": list(engine.batch_buckets),
          "rounds": FLAGS.rounds, "runtime": engine.runtime, "precision": engine.precision,
          "budget": rule.budget, "rule": rule.to_json(), "cpu": common.cpu_info(),
          "paths": {kind.engine: served, kind.full: full}, "speedup": served["speedup"],
          "flops_reduction": full["gflops_per_example"] / served["gflops_per_example"],
          "accuracy_drop_points": 100 * (full["accuracy"] - served["accuracy"])}
  metrics = run.task.metrics
  rows = [[name, p["examples_per_second"], *(100 * p[m] for m in metrics),
           p["gflops_per_example"], common.shares_line(p[kind.share_key])]
          for name, p in data["paths"].items()]
  notes = (f"{len(dev)} {run.task.name} dev examples, token ids to labels, {engine.runtime} "
           f"{engine.precision}, batch buckets {tuple(engine.batch_buckets)}, the "
           f"{rule.name} rule at {rule.budget or 'its own setting'} "
           f"({served['calibration_reduction']:.2f}x on the held-out training examples), CPU: "
           f"{common.cpu_line(data['cpu'])}; median of {FLAGS.rounds} interleaved passes. The "
           f"{kind.engine} serves {data['speedup']:.2f}x the {kind.full}'s throughput at "
           f"{data['flops_reduction']:.2f}x fewer FLOPs, {data['accuracy_drop_points']:+.2f} "
           "points accuracy drop.")
  common.write_outputs(FLAGS.out, "throughput", data, f"{run.task.name} dev throughput", [
      "path", "examples/s", *common.metric_columns(metrics), "GFLOPs/example",
      "share per route"], rows, notes)
  plot_throughput(os.path.join(FLAGS.out, "throughput.png"), data)
  common.print_report(FLAGS.out, "throughput")


def plot_throughput(path: str, data: dict) -> None:
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


# --- stacks: tokenisation and sorted batches for the Hugging Face paths -------------------------

def versions() -> dict:
  return {"python": platform.python_version(),
          **{name: report.package_version(name) for name in PACKAGES}}


def tokenize(tokenizer, texts: Sequence[tuple[str, ...]], max_length: int
             ) -> tuple[list[list[int]], list[list[int]]]:
  """Unpadded ids and token types, truncated exactly as the engine truncates (`encode_texts`)."""
  columns = [list(c) for c in zip(*texts)]
  enc = tokenizer(*columns, truncation=True, max_length=max_length, return_token_type_ids=True,
                  return_attention_mask=False)
  return enc["input_ids"], enc["token_type_ids"]


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, longest] int64 ids (or types) and the attention mask."""
  lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
  out = np.full((len(rows), lengths.max()), pad_id, np.int64)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, length_mask(lengths, out.shape[1]).astype(np.int64)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
  """Row indices in batches of similar length: little padding for the dynamic-shape runtimes."""
  order = np.argsort(np.asarray(lengths), kind="stable")
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sorted_probabilities(run_batch: RunBatch, tokenizer, texts, max_length: int,
                         batch_size: int, num_classes: int) -> np.ndarray:
  """Tokenise, run in length-sorted batches, return class probabilities in input order."""
  ids, types = tokenize(tokenizer, texts, max_length)
  probabilities = np.zeros((len(texts), num_classes), np.float32)
  for rows in length_sorted_batches([len(r) for r in ids], batch_size):
    batch_ids, mask = pad([ids[i] for i in rows], tokenizer.pad_token_id)
    batch_types, _ = pad([types[i] for i in rows], 0)
    probabilities[rows] = softmax(run_batch(batch_ids, mask, batch_types))
  return probabilities


def torch_runner(model) -> RunBatch:
  import torch

  def run(ids, mask, types):
    with torch.inference_mode():
      return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   token_type_ids=torch.from_numpy(types)).logits.numpy()
  return run


def export_onnx(hf_dir: str, path: str, sample: tuple[np.ndarray, ...]) -> None:
  """The HF model as ONNX with dynamic batch and sequence axes.

  The TorchScript exporter (dynamo=False) needs only `onnx`, where the default dynamo exporter
  needs onnxscript too. A graph traced on a padded sample serves unpadded inputs exactly, and
  the other way round (checked with torch 2.13 / transformers 5.23, both attention kernels).
  """
  import torch
  import transformers

  model = transformers.BertForSequenceClassification.from_pretrained(
      hf_dir, attn_implementation="eager").eval()
  axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {"logits": {0: "batch"}}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(model, tuple(torch.from_numpy(x) for x in sample), path,
                      input_names=list(INPUT_NAMES), output_names=["logits"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)


def quantize_int8(fp32_path: str, int8_path: str) -> None:
  from onnxruntime.quantization import QuantType, quantize_dynamic

  quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)


def onnx_runner(path: str, threads: int) -> RunBatch:
  import onnxruntime as ort

  options = ort.SessionOptions()
  options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  return lambda ids, mask, types: session.run(
      ["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]


# --- stacks: the paths -------------------------------------------------------------------------

def engine_paths(run: Run, calibration: batching.Encoded, budgets: Sequence[str], threads: int
                 ) -> tuple[dict[str, dict], dict[str, str], common.Kind]:
  """({name: {"run": texts -> probabilities [N, C], ...description}}, {skipped: why}, the
  run's kind): the whole model and the engine at each budget and rule, on every runtime and
  precision asked that the run's model runs."""
  paths, skipped, kind = {}, {}, None
  for runtime, precision in runtime_precisions(FLAGS.runtimes, FLAGS.precisions):
    prefix = "sharcs_jax" if runtime == "xla" else "sharcs_jax ort"
    suffix = "" if precision == "fp32" else f" {precision}"
    try:
      engine = common.open_engine(run, runtime=runtime, precision=precision, threads=threads)
    except app.UsageError as e:
      skipped[f"{prefix}{suffix}"] = str(e)
      continue
    kind = common.kind_of(engine)
    described = dict(runtime=prefix, precision=precision,
                     batch=f"buckets {engine.batch_sizes}" if runtime == "xla" else
                     f"any, 1-{max(engine.batch_sizes)}")
    full = kind.full_program(engine, threads)
    paths[f"{prefix} {kind.full}{suffix}"] = dict(
        described, run=lambda t, f=full, e=engine: f(e.encode(t)), engine=engine)
    if kind.staged_full is not None and runtime != "xla":  # what a call more per batch costs
      staged = kind.staged_full(engine)
      paths[f"{prefix} {kind.staged_full_name}{suffix}"] = dict(
          described, run=lambda t, e=staged: e.predict(t).probabilities, engine=staged,
          off_pareto=True)
    rules, unreachable = budget_rules(
        engine, calibration, budgets, common.checked_rules(kind, "rules"),
        every_stage=calibration_stages(engine, kind, calibration), signal=FLAGS.signal)
    engine_name = lambda name: f"{prefix} {kind.engine_path} {name}{suffix}"
    skipped |= {engine_name(name): why for name, why in unreachable.items()}
    for name, rule in rules.items():
      routed = engine.with_rule(rule)
      paths[engine_name(name)] = dict(described, run=lambda t, e=routed: e.predict(t).probabilities,
                                      engine=routed, routed=True)
  if kind is None:
    raise app.UsageError("no runtime and precision asked runs this model: "
                         + "; ".join(skipped.values()))
  return paths, skipped, kind


def hf_paths(hf_dir: str, scratch: str, texts, threads: int, max_length: int, classes: int
             ) -> tuple[dict[str, dict], dict]:
  """The stock paths on the Hugging Face export in `hf_dir`: PyTorch eager and ONNX Runtime
  fp32 / int8 of its `torch.onnx.export` (written into `scratch`); and the model files' sizes."""
  import torch
  import transformers

  paths = {}
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  torch.set_num_threads(threads)
  pt = torch_runner(transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval())
  paths["pytorch eager b32"] = dict(
      runtime="pytorch", precision="fp32", batch=f"{BATCH}, length-sorted",
      run=lambda t: sorted_probabilities(pt, tokenizer, t, max_length, BATCH, classes))

  ids, types = tokenize(tokenizer, texts[:2], max_length)
  sample_ids, sample_mask = pad(ids, tokenizer.pad_token_id)
  sample = (sample_ids, sample_mask, pad(types, 0)[0])
  files = {"fp32": os.path.join(scratch, "model.onnx"),
           "int8": os.path.join(scratch, "model.int8.onnx")}
  export_onnx(hf_dir, files["fp32"], sample)
  quantize_int8(files["fp32"], files["int8"])
  for precision, path in files.items():
    session = onnx_runner(path, threads)
    for batch in sorted({int(b) for b in FLAGS.hf_batches} | {BATCH}):
      paths[f"onnxruntime {precision} b{batch}"] = dict(
          runtime="onnxruntime", precision=precision,
          batch="1" if batch == 1 else f"{batch}, length-sorted",
          run=lambda t, s=session, b=batch: sorted_probabilities(s, tokenizer, t, max_length,
                                                                 b, classes))
  sizes = {"safetensors_mb": os.path.getsize(os.path.join(hf_dir, hf_export.WEIGHTS_FILE)) / 2**20,
           **{f"onnx_{p}_mb": os.path.getsize(f) / 2**20 for p, f in files.items()}}
  with torch.inference_mode():  # one padded batch through both fp32 runtimes: the same model
    difference = np.abs(onnx_runner(files["fp32"], threads)(*sample) - pt(*sample)).max()
  sizes["max_abs_logit_difference_onnx_fp32_vs_pytorch"] = float(difference)
  return paths, sizes


def runtime_precisions(runtimes: Sequence[str], requested: Sequence[str]
                       ) -> list[tuple[str, str]]:
  """(runtime, precision) for every requested precision each runtime runs ("auto" resolved for
  this CPU), each once, XLA fp32 (the reference) first."""
  order = ["fp32", "bf16", "int8"]
  out = []
  for runtime in ["xla"] + [r for r in runtimes if r != "xla"]:
    allowed = [p for p in requested if p in PRECISIONS[runtime]]
    resolved = {resolve_precision(p, jax.default_backend(), runtime=runtime) for p in allowed}
    out += [(runtime, p) for p in sorted(resolved, key=order.index)]
  return out


def measure(paths: dict[str, dict], texts, labels: np.ndarray, metrics: tuple[str, ...],
            rounds: int, reference: str, bar: str | None, kind: common.Kind) -> dict[str, dict]:
  """Interleaved timed passes; each path's outputs from its own last pass, compared with the
  `reference` path's, its speed a multiple of the `bar`'s."""
  outputs = {}
  candidates = {name: (lambda n=name: outputs.__setitem__(n, paths[n]["run"](texts)))
                for name in paths}
  times = common.time_side_by_side(candidates, rounds, warmup=1)
  full = outputs[reference]
  results = {}
  for name, path in paths.items():
    median, predicted = float(np.median(times[name])), outputs[name].argmax(-1)
    entry = {k: v for k, v in path.items() if k not in ("run", "engine", "routed")}
    entry |= {"examples_per_second": len(texts) / median, "median_seconds": median,
              "seconds": times[name].tolist(),
              **evaluate.classification_metrics(predicted, labels, metrics),
              "agreement_with_full_width": float(np.mean(predicted == full.argmax(-1))),
              "max_abs_probability_difference_vs_full_width":
                  float(np.abs(outputs[name] - full).max())}
    if "engine" in path:
      entry |= engine_details(path["engine"], kind, texts, path.get("routed", False))
    results[name] = entry
  if bar is not None:
    for entry in results.values():
      entry["speed_vs_onnxruntime_int8"] = (entry["examples_per_second"]
                                            / results[bar]["examples_per_second"])
  return results


def engine_details(engine: Engine, kind: common.Kind, texts, routed: bool) -> dict:
  """XLA cost-analysis GFLOPs per example; for a routed engine its rule and where it routed."""
  data = engine.encode(texts)
  full = float(engine.full_gflops(data).mean())
  if not routed:
    return {"gflops_per_example": full}
  predictions = engine.run(data)
  gflops = float(predictions.gflops.mean())
  return {"gflops_per_example": gflops, "dev_flops_reduction": full / gflops,
          "rule": engine.rule.to_json(), "calibration_reduction": engine.rule.calibration_reduction,
          **kind.route_figures(predictions, engine.route_names())}


def environment(threads: int) -> dict:
  """What every number of a serving report depends on beside the model: CPU, threads, versions."""
  import onnxruntime
  import torch

  return {"cpu": common.cpu_info(),
          "threads": {"pytorch": torch.get_num_threads(), "onnxruntime_intra_op": threads,
                      "xla": "XLA CPU's own pool (all usable CPUs)",
                      "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
          "onnxruntime_providers": onnxruntime.get_available_providers(),
          "versions": versions()}


def stacks_main(run: Run) -> None:
  threads = common.threads()
  budgets = common.checked_budgets(FLAGS.budgets, special=("max",))
  (split,) = run.splits("dev", limit=FLAGS.limit)  # as the run read it
  texts = split.texts
  with tempfile.TemporaryDirectory(prefix="sharcs-serving-") as tmp:
    paths, skipped, kind = engine_paths(run, common.calibration_data(run), budgets, threads)
    hf_dir, sizes = os.path.join(tmp, "hf"), {}
    try:
      hf_export.export_workdir(run.workdir, hf_dir)
    except hf_export.ExportError as e:
      skipped["stock paths"] = f"the run exports no Hugging Face model: {e}"
    else:
      stock, sizes = hf_paths(hf_dir, tmp, texts, threads, run.length_buckets[-1],
                              run.model.num_classes)
      paths |= stock
    reference = f"sharcs_jax {kind.full}"
    bar = next((b for b in (BAR, f"sharcs_jax ort {kind.full} int8") if b in paths), None)
    print(f"{len(texts)} {run.task.name} dev examples, {len(paths)} paths, {FLAGS.rounds} "
          "rounds", flush=True)
    results = measure(paths, texts, split.labels, run.task.metrics, FLAGS.rounds, reference, bar,
                      kind)
  data = {"task": run.task.name, "workdir": run.workdir, "backbone": run.config.model.backbone,
          "model": kind.model, "full": kind.full, "examples": len(texts), "rounds": FLAGS.rounds,
          "max_length": run.length_buckets[-1], "length_buckets": list(run.length_buckets),
          **environment(threads), "model_files": sizes, "paths": results, "skipped": skipped,
          "bar": bar}
  write_stacks(FLAGS.out, data, run.task.metrics)


def write_stacks(out: str, data: dict, metrics: Sequence[str]) -> None:
  has_f1 = "f1" in metrics
  header = ["path", "batch", "examples/s", f"x {data['bar']}", "median s", "accuracy (%)"] + (
      ["F1 (%)"] if has_f1 else []) + [f"same label as {data['full']} (%)", "max abs prob. diff.",
                                       "GFLOPs/example"]
  rows = [[name, p["batch"], p["examples_per_second"], p.get("speed_vs_onnxruntime_int8", ""),
           p["median_seconds"], 100 * p["accuracy"]]
          + ([100 * p["f1"]] if has_f1 else [])
          + [100 * p["agreement_with_full_width"],
             f"{p['max_abs_probability_difference_vs_full_width']:.1e}",
             p.get("gflops_per_example", "")]
          for name, p in data["paths"].items()]
  v = data["versions"]
  notes = (f"{data['examples']} {data['task']} dev examples, text in -> labels out (tokenisation "
           f"inside every timed pass, truncation at {data['max_length']} tokens), median of "
           f"{data['rounds']} interleaved passes. CPU: {common.cpu_line(data['cpu'])}. Threads: "
           f"PyTorch {data['threads']['pytorch']}, ONNX Runtime "
           f"{data['threads']['onnxruntime_intra_op']} intra-op. Versions: jax {v['jax']}, torch "
           f"{v['torch']}, transformers {v['transformers']}, onnxruntime {v['onnxruntime']}. "
           f"A {data['model']} run: each budget's rule calibrated on the run's held-out training "
           f"examples, each runtime on its own programs; 'same label' is against its "
           f"{data['full']}.")
  if data["skipped"]:
    notes += " Skipped: " + "; ".join(f"{k}: {e}" for k, e in data["skipped"].items())
  common.write_outputs(out, "serving", data, f"{data['task'].upper()} serving on CPU", header,
                       rows, notes)
  plot_stacks(os.path.join(out, "serving.png"), data)
  plot_stacks_pareto(os.path.join(out, "serving_pareto.png"), data)
  common.print_report(out, "serving")


def plot_stacks(path: str, data: dict) -> None:
  """Examples/s per path, each bar labelled with its dev accuracy."""
  names = list(data["paths"])
  speeds = [data["paths"][n]["examples_per_second"] for n in names]
  colors = {"sharcs_jax": "tab:red", "sharcs_jax ort": "tab:purple", "pytorch": "tab:orange",
            "onnxruntime": "tab:blue"}
  fig, ax = report.pyplot().subplots(figsize=(8, 0.45 * len(names) + 1.5))
  bars = ax.barh(names, speeds, color=[colors[data["paths"][n]["runtime"]] for n in names])
  for bar, name in zip(bars, names):
    p = data["paths"][name]
    ax.annotate(f" accuracy {100 * p['accuracy']:.2f}%",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, 1.2 * max(speeds))
  ax.set_xlabel("examples / s (median pass; labels: dev accuracy)")
  ax.set_title(f"{data['task']} dev, {data['examples']} examples, {data['cpu']['model']}",
               fontsize=9)
  ax.grid(axis="x", alpha=0.3)
  report.save_figure(fig, path, dpi=110)


def plot_stacks_pareto(path: str, data: dict) -> None:
  """Pairs/s against dev accuracy: one line per engine runtime and precision through its whole
  model and budgets, one marker per stock path."""
  fig, ax = report.pyplot().subplots(figsize=(8, 5.5))
  lines: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
  for name, p in data["paths"].items():
    point = (100 * p["accuracy"], p["examples_per_second"])
    if p.get("off_pareto"):  # a variant of a point already on a line (in the bars)
      continue
    if p["runtime"].startswith("sharcs_jax"):
      reduction = p.get("dev_flops_reduction", 1.0)
      key = (p["runtime"], p["precision"])
      lines.setdefault(key, []).append((*point, f"{reduction:.2g}x"))
    else:
      ax.scatter(*point, marker="s", s=40, label=f"{name}", zorder=3)
  styles = {"fp32": "--", "bf16": "-", "int8": "-"}
  for (runtime, precision), points in lines.items():
    points.sort(key=lambda q: q[1])
    label = f"{'XLA' if runtime == 'sharcs_jax' else 'ONNX Runtime'} {precision} (engine)"
    color = {"sharcs_jax": "tab:red", "sharcs_jax ort": "tab:purple"}[runtime]
    ax.plot([q[0] for q in points], [q[1] for q in points], styles[precision], marker="o",
            label=label, color=color, alpha=1.0 if precision != "fp32" else 0.6)
    for accuracy, speed, tag in points:
      ax.annotate(tag, (accuracy, speed), textcoords="offset points", xytext=(4, 3), fontsize=7)
  ax.set_xlabel("dev accuracy (%)")
  ax.set_ylabel("pairs / s (text in, labels out; median pass)")
  ax.set_title(f"{data['task']} dev, {data['examples']} examples, {common.cpu_line(data['cpu'])}",
               fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  report.save_figure(fig, path, dpi=110)


def main(argv):
  del argv
  quiet_orbax_logging()
  apply_mode_defaults()
  run = load_run(FLAGS.workdir)
  {"stacks": stacks_main, "budgets": budgets_main, "throughput": throughput_main}[FLAGS.mode](run)


if __name__ == "__main__":
  app.run(one_line_errors(main))
