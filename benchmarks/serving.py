"""Text in, labels out: the SHARCS engine against stock CPU serving stacks on the same model.

    python -m benchmarks.serving --workdir=/tmp/sharcs_qqp --out=/tmp/bench \
        [--budgets=1.5x,2x,2.5x] [--runtimes=xla,onnxruntime] [--rounds=3] [--limit=0]

Every path serves the full-width model of the run in --workdir (or, for the engine at a budget,
the run's SHARCS model routed to that FLOPs budget), on the dev split of the run's own task:
  - `sharcs_jax full width`: the whole model at width 1.0 on its precompiled XLA programs (no
    router), length buckets and batch buckets as `throughput.py` times it;
  - `sharcs_jax engine <budget> <rule>`: `Engine` with the rule calibrated to that budget on the
    run's held-out calibration split;
  - `sharcs_jax ort full width` / `sharcs_jax ort engine <budget> <rule>`: the same engine with
    its programs on ONNX Runtime (fp32 or int8; the full width is the whole model at width 1.0
    as one ONNX program, the budget rules calibrated on the ONNX programs' own probabilities);
    `sharcs_jax ort prefix+part full width` is every input at width 1.0 through the engine's
    prefix and full part (two sessions per batch);
  - `pytorch eager b32`: `BertForSequenceClassification` on the Hugging Face export
    (`sharcs_jax.serve.export.hf`; transformers' default SDPA attention), batches of 32 sorted by
    length, each padded to its longest row;
  - `onnxruntime fp32 b1 / b32`: that model exported with `torch.onnx.export` (dynamic batch and
    sequence axes), one input at a time, and sorted batches of 32;
  - `onnxruntime int8 b1 / b32`: the same graph after `quantize_dynamic` (int8 weights, dynamic
    int8 activations).
Each timed pass tokenises the texts (the same tokenizer files and the same truncation for every
path) and ends with class probabilities (labels are their argmax) in input order. Paths run in
interleaved rounds in one process; the median pass is reported with each path's dev metrics and
its speed as a multiple of ONNX Runtime int8 of the HF export (sorted batches of 32). Writes
serving.json, serving.md, serving.png (bars) and serving_pareto.png (pairs/s against dev accuracy)
into --out. torch, onnx and onnxruntime come from the `test` extra.
"""

from __future__ import annotations

import copy
import itertools
import os
import platform
import tempfile
import warnings
from typing import Callable, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import common
from sharcs_jax import evaluate
from sharcs_jax.serve.export import hf as hf_export
from sharcs_jax import report
from sharcs_jax.data import glue
from sharcs_jax.data.padding import length_mask
from sharcs_jax.checkpoint import holds_early_exit
from sharcs_jax.run import load_run
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve import dispatch, routing
from sharcs_jax.serve.precision import PRECISIONS
from sharcs_jax.serve.precision import resolve as resolve_precision
from sharcs_jax.serve.programs import Programs

flags.DEFINE_string("workdir", None, "A trained run (its checkpoints).", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("rounds", 3, "Interleaved timed passes over dev per path.")
flags.DEFINE_integer("limit", 0, "> 0: only the first N dev examples.")
flags.DEFINE_list("budgets", ["1.5x", "2x", "2.5x"], "FLOPs budgets to route the engine to ('2x', "
                  "'0.4gflops'), calibrated on the run's held-out examples.")
flags.DEFINE_list("rules", ["cascade"], "Routing rules to meet each budget with "
                  "(router, cascade).")
flags.DEFINE_list("runtimes", ["xla", "onnxruntime"], "Runtimes of the engine's programs.")
flags.DEFINE_list("precisions", ["fp32", "auto"], "Engine precisions to serve at, each on every "
                  "runtime that runs it: fp32; bf16 (xla); int8 (onnxruntime); auto: bf16 where "
                  "the CPU multiplies bf16 natively on xla, int8 where it has an int8 dot product "
                  "on onnxruntime.")
flags.DEFINE_list("hf_batches", [str(32)], "Batch sizes of the ONNX Runtime paths of the HF export "
                  "(1: one input at a time; 32: sorted batches).")
flags.DEFINE_integer("threads", 0, "PyTorch and ONNX Runtime intra-op threads; 0: every usable "
                     "CPU (XLA always sizes its own pool to the machine).")
FLAGS = flags.FLAGS

BATCH = 32
BAR = f"onnxruntime int8 b{BATCH}"  # the strongest stock path: every speed is also a multiple of it
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "tokenizers", "onnx", "onnxruntime",
            "numpy")

RunBatch = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # ids, mask, types -> logits


def versions() -> dict:
  return {"python": platform.python_version(),
          **{name: report.package_version(name) for name in PACKAGES}}


# --- tokenisation and sorted batches for the Hugging Face paths --------------------------------

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


# --- the runtimes ------------------------------------------------------------------------------

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


def budget_engines(engine: Engine, budgets: Sequence[str], rules: Sequence[str] = ("router",),
                   prefix: str = "sharcs_jax") -> tuple[dict[str, Engine], dict]:
  """One engine per reachable budget and rule, sharing the compiled programs (each rule
  calibrated on those programs' probabilities); unreachable ones named."""
  (calibration,) = engine.trained.encoded("calibration")
  engines, skipped = {}, {}
  for budget, rule_name in itertools.product(budgets, rules):
    name = f"{prefix} engine {budget}" + ("" if rule_name == "router" else f" {rule_name}")
    try:
      rule = engine.calibrate(budget, calibration, rule_name)
    except ValueError as e:
      logging.warning("%s: %s", name, e)
      skipped[name] = str(e)
      continue
    routed = copy.copy(engine)
    routed.rule = rule
    engines[name] = routed
  return engines, skipped


# --- the benchmark -----------------------------------------------------------------------------

def build_paths(engine: Engine, workdir: str, budgets: Sequence[str], hf_dir: str, scratch: str,
                texts, threads: int) -> tuple[dict[str, dict], dict[str, str], dict]:
  """({name: {"run": texts -> probabilities [N, C], ...description}}, skipped budgets, model
  files); the ONNX models are written into `scratch`."""
  params, max_length = engine.variables["params"], engine.length_buckets[-1]
  classes = engine.model.num_classes
  paths, skipped = {}, {}
  for runtime, precision in runtime_precisions(FLAGS.runtimes, FLAGS.precisions):
    at = engine if (runtime, precision) == (engine.runtime, engine.precision) \
        else at_precision(engine, precision, runtime)
    suffix = "" if precision == "fp32" else f" {precision}"
    prefix = "sharcs_jax" if runtime == "xla" else "sharcs_jax ort"
    described = dict(runtime=prefix, precision=precision,
                     batch="buckets " + str(at.batch_buckets) if runtime == "xla" else
                     f"any, 1-{max(at.batch_sizes)}")
    if runtime == "xla":
      full = Programs(at.model, params, batch_buckets=at.batch_buckets,
                      length_buckets=at.length_buckets, kinds=("forward",),
                      cache_dir=os.path.join(workdir, "executables"))
      paths[prefix + " full width" + suffix] = dict(
          described, run=lambda t, f=full, e=at: common.full_width_probabilities(
              f, params, e.encode(t)), engine=at)
    else:  # the whole model at width 1.0 as one ONNX program, as XLA's is one
      from sharcs_jax.serve.onnx.programs import OnnxPrograms  # the serve extra, only here

      call = OnnxPrograms(at.model, params, precision=at.precision, full_width=True,
                          cache_dir=os.path.join(workdir, "executables")).full_width_call(threads)
      paths[prefix + " full width" + suffix] = dict(
          described, run=lambda t, c=call, e=at: onnx_full_width(c, e, t), engine=at)
      # ... and through the engine's two sessions (prefix, then the full part): what a call
      # more per batch costs.
      fixed = copy.copy(at)
      fixed.rule = routing.Fixed(len(at.widths) - 1, budget="1x")
      paths[prefix + " prefix+part full width" + suffix] = dict(
          described, run=lambda t, e=fixed: e.predict(t).probabilities, engine=fixed,
          off_pareto=True)
    engines, unreachable = budget_engines(at, budgets, FLAGS.rules, prefix)
    skipped |= {name + suffix: why for name, why in unreachable.items()}
    for name, routed in engines.items():
      paths[name + suffix] = dict(described, run=lambda t, e=routed: e.predict(t).probabilities,
                                  engine=routed, routed=True)

  stock, sizes = hf_paths(hf_dir, scratch, texts, threads, max_length, classes)
  return paths | stock, skipped, sizes


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


def build_exit_paths(workdir: str, budgets: Sequence[str], scratch: str, texts, threads: int
                     ) -> tuple[dict[str, dict], dict[str, str], dict]:
  """`build_paths` for an early-exit run: its full depth (one program) and its exit engine at
  each budget (DeeBERT's entropy rule calibrated on the run's calibration split, on each
  runtime's own programs), on every runtime and precision the exit engine runs; the stock
  paths where its exits read [CLS] (the HF export has no mean-pooled head)."""
  from sharcs_jax.data import batching
  from sharcs_jax.serve.exit_layout import calibration_split

  run = load_run(workdir)
  config, model = run.config, run.model
  try:
    calibration = calibration_split(config, workdir)
  except ValueError as e:
    raise app.UsageError(str(e))
  paths, skipped = {}, {}
  for runtime, precision in runtime_precisions(FLAGS.runtimes, FLAGS.precisions):
    if runtime == "xla" and precision != "fp32":
      continue  # an early-exit model runs fp32 on XLA
    serve = lambda **options: Engine.from_run(run, runtime=runtime, precision=precision,
                                              threads=threads, signal="entropy", **options)
    prefix = "sharcs_jax" if runtime == "xla" else "sharcs_jax ort"
    suffix = "" if precision == "fp32" else f" {precision}"
    full = serve(exit_layers=[model.encoder.num_layers])
    described = dict(runtime=prefix, precision=precision,
                     batch=f"buckets {full.batch_sizes}" if runtime == "xla" else
                     f"any, 1-{max(full.batch_sizes)}")
    paths[f"{prefix} full depth{suffix}"] = dict(
        described, run=lambda t, e=full: e.predict(t).probabilities, engine=full)
    engine = serve(exit_layers=range(1, model.encoder.num_layers + 1))  # every exit
    (data,) = batching.encode_splits([calibration], engine.tokenizer, engine.length_buckets)
    every_stage = engine.every_stage(data)
    for budget in budgets:
      name = f"{prefix} exit engine {budget}{suffix}"
      try:
        rule = engine.calibrate(budget, data, signal="entropy", every_stage=every_stage)
      except ValueError as e:
        skipped[name] = str(e)
        continue
      routed = engine.with_rule(rule)
      paths[name] = dict(described, run=lambda t, e=routed: e.predict(t).probabilities,
                         engine=routed, routed=True)
  sizes = {}
  if model.pooling == "cls":
    hf_dir = os.path.join(scratch, "hf")
    hf_export.export_workdir(workdir, hf_dir)
    stock, sizes = hf_paths(hf_dir, scratch, texts, threads, config.data.length_buckets[-1],
                            model.num_classes)
    paths |= stock
  return paths, skipped, sizes


def onnx_full_width(call: Callable[..., np.ndarray], engine: Engine, texts) -> np.ndarray:
  """Probabilities [N, C] of the one-program full-width model, rows batched as the engine
  batches them (ascending length, its batch sizes, any length)."""
  data = engine.encode(texts)
  return dispatch.run_each_row(call, data.input_ids, data.token_type_ids, data.lengths,
                               columns=engine.model.num_classes,
                               program_lengths=engine.program_lengths,
                               batch_buckets=engine.batch_sizes)


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


def at_precision(engine: Engine, precision: str, runtime: str = "xla") -> Engine:
  """The same run's engine with its matmuls at `precision` on `runtime` (its own programs)."""
  other = Engine(engine.model, engine.variables["params"], length_buckets=engine.length_buckets,
                 batch_buckets=engine.batch_buckets, tokenizer=engine.tokenizer,
                 task=engine.task, cache_dir=os.path.join(engine.trained.workdir, "executables"),
                 precision=precision, runtime=runtime)
  other.trained = engine.trained
  return other


def measure(paths: dict[str, dict], texts, labels: np.ndarray, metrics: tuple[str, ...],
            rounds: int, reference: str = "sharcs_jax full width", bar: str = BAR
            ) -> dict[str, dict]:
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
      entry |= engine_details(path["engine"], texts, path.get("routed", False))
    results[name] = entry
  if bar in results:
    for entry in results.values():
      entry["speed_vs_onnxruntime_int8"] = (entry["examples_per_second"]
                                            / results[bar]["examples_per_second"])
  return results


def engine_details(engine: Engine, texts, routed: bool) -> dict:
  """XLA cost-analysis GFLOPs per example; for a routed engine its rule and where it routed."""
  data = engine.encode(texts)
  full = float(engine.full_gflops(data).mean())
  if not routed:
    return {"gflops_per_example": full}
  predictions = engine.run(data)
  gflops = float(predictions.gflops.mean())
  by_width = engine.layout.by_width
  return {"gflops_per_example": gflops, "dev_flops_reduction": full / gflops,
          "rule": engine.rule.to_json(), "calibration_reduction": engine.rule.calibration_reduction,
          **({} if by_width else {"mean_exit_layer": float(predictions.exit_layers.mean())}),
          "share_per_width" if by_width else "share_per_exit":
              predictions.share_per_route(engine.route_names())}


def main(argv):
  del argv
  threads = FLAGS.threads or len(os.sched_getaffinity(0))
  if holds_early_exit(FLAGS.workdir):
    return exit_main(threads)
  engine = Engine.from_workdir(FLAGS.workdir)
  task = engine.task
  (split,) = engine.trained.splits("dev", limit=FLAGS.limit)  # as the run read it
  texts = split.texts
  with tempfile.TemporaryDirectory(prefix="sharcs-serving-") as tmp:
    hf_dir = os.path.join(tmp, "hf")
    hf_export.export_hf(engine.trained.config, engine.model, engine.variables["params"], hf_dir)
    paths, skipped, sizes = build_paths(engine, FLAGS.workdir, FLAGS.budgets, hf_dir, tmp, texts,
                                        threads)
    print(f"{len(texts)} {task.name} dev examples, {len(paths)} paths, {FLAGS.rounds} rounds",
          flush=True)
    results = measure(paths, texts, split.labels, task.metrics, FLAGS.rounds)
  data = {"task": task.name, "workdir": FLAGS.workdir, "backbone": engine.trained.config.model.backbone,
          "examples": len(texts), "rounds": FLAGS.rounds, "max_length": engine.length_buckets[-1],
          "length_buckets": list(engine.length_buckets), **environment(threads),
          "model_files": sizes, "paths": results, "skipped": skipped, "bar": BAR}
  write_reports(FLAGS.out, data, task)


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


EXIT_BAR = "sharcs_jax ort full depth int8"  # a mean-pooled exit run's bar: no stock head pools


def exit_main(threads: int) -> None:
  """An early-exit run served text in, labels out: its full depth and exit engine on each
  runtime, beside the stock paths of its HF export where its exits read [CLS]."""
  config = load_run(FLAGS.workdir).config
  task = glue.get_task(config.task)
  split = glue.first(glue.run_splits(config)[1], FLAGS.limit)
  with tempfile.TemporaryDirectory(prefix="sharcs-serving-") as tmp:
    paths, skipped, sizes = build_exit_paths(FLAGS.workdir, FLAGS.budgets, tmp, split.texts,
                                             threads)
    bar = BAR if BAR in paths else EXIT_BAR
    print(f"{len(split.texts)} {task.name} dev examples, {len(paths)} paths, {FLAGS.rounds} "
          "rounds", flush=True)
    results = measure(paths, split.texts, split.labels, task.metrics, FLAGS.rounds,
                      reference="sharcs_jax full depth", bar=bar)
  data = {"task": task.name, "workdir": FLAGS.workdir, "backbone": config.model.backbone,
          "model": "early_exit", "exit_pooling": config.model.exit_pooling,
          "examples": len(split.texts), "rounds": FLAGS.rounds,
          "max_length": config.data.length_buckets[-1],
          "length_buckets": list(config.data.length_buckets), **environment(threads),
          "model_files": sizes, "paths": results, "skipped": skipped, "bar": bar}
  write_reports(FLAGS.out, data, task)


def write_reports(out: str, data: dict, task: glue.Task) -> None:
  has_f1 = "f1" in task.metrics
  header = ["path", "batch", "examples/s", f"x {data['bar']}", "median s", "accuracy (%)"] + (
      ["F1 (%)"] if has_f1 else []) + ["same label as full width (%)", "max abs prob. diff.",
                                       "GFLOPs/example"]
  rows = [[name, p["batch"], p["examples_per_second"], p.get("speed_vs_onnxruntime_int8", ""),
           p["median_seconds"], 100 * p["accuracy"]]
          + ([100 * p["f1"]] if has_f1 else [])
          + [100 * p["agreement_with_full_width"],
             f"{p['max_abs_probability_difference_vs_full_width']:.1e}",
             p.get("gflops_per_example", "")]
          for name, p in data["paths"].items()]
  cpu = data["cpu"]
  v = data["versions"]
  notes = (f"{data['examples']} {data['task']} dev examples, text in -> labels out (tokenisation "
           f"inside every timed pass, truncation at {data['max_length']} tokens), median of "
           f"{data['rounds']} interleaved passes. CPU: {common.cpu_line(cpu)}. Threads: PyTorch "
           f"{data['threads']['pytorch']}, ONNX Runtime {data['threads']['onnxruntime_intra_op']} "
           f"intra-op. Versions: jax {v['jax']}, torch "
           f"{v['torch']}, transformers {v['transformers']}, onnxruntime {v['onnxruntime']}.")
  if data.get("model") == "early_exit":
    notes += (f" An early-exit run ({data['exit_pooling']} pooling): its exit engine's entropy "
              "rule calibrated to each budget on the run's held-out training examples, each "
              "runtime on its own programs; 'same label' is against its full depth.")
  if data["skipped"]:
    notes += " Skipped: " + "; ".join(f"{k}: {e}" for k, e in data["skipped"].items())
  common.write_outputs(out, "serving", data, f"{data['task'].upper()} serving on CPU", header,
                       rows, notes)
  plot(os.path.join(out, "serving.png"), data)
  plot_pareto(os.path.join(out, "serving_pareto.png"), data)
  print(open(os.path.join(out, "serving.md")).read())


def plot(path: str, data: dict) -> None:
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


def plot_pareto(path: str, data: dict) -> None:
  """Pairs/s against dev accuracy: one line per engine runtime and precision through its full
  width and budgets, one marker per stock path."""
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


if __name__ == "__main__":
  app.run(main)
