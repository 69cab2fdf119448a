"""What every benchmark shares: its flags (declared once here), the engine opened from a run, what
differs between a SHARCS and an early-exit run (`Kind`, read from the engine's layout once),
side-by-side timing and report files."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import app, flags

from sharcs_jax import evaluate
from sharcs_jax import report
from sharcs_jax.data import batching, glue
from sharcs_jax.run import Run
from sharcs_jax.serve import dispatch, routing
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.exit_layout import leave_costs
from sharcs_jax.serve.layout import Predictions
from sharcs_jax.serve.precision import PRECISIONS, RUNTIMES
from sharcs_jax.serve.programs import Programs

FLAGS = flags.FLAGS
EXIT_RULE = "exit"  # an early-exit run's one rule: its exit threshold, calibrated to a budget

# name -> (absl definer, default, help[, enum values]). A benchmark takes the ones it reads with
# `define_flags`, with its own default where it needs one, so that a flag means the same in each.
SHARED_FLAGS: dict[str, tuple] = {
    "workdir": (flags.DEFINE_string, None, "A trained run (its checkpoints); its task's dev split "
                "is read as training read it."),
    "out": (flags.DEFINE_string, None, "Output directory."),
    "rounds": (flags.DEFINE_integer, 3, "Interleaved timed passes per path (the median is "
               "reported)."),
    "limit": (flags.DEFINE_integer, 0, "> 0: only the first N dev examples (for tests)."),
    "runtime": (flags.DEFINE_enum, "xla", "What runs the engine's programs.", RUNTIMES),
    "precision": (flags.DEFINE_enum, "fp32", "The engine's matmul precision: fp32, bf16 (xla), "
                  "int8 (onnxruntime); auto: the fastest this CPU runs natively (an early-exit "
                  "model: fp32 on xla).", sorted(set(sum(PRECISIONS.values(), ())))),
    "runtimes": (flags.DEFINE_list, ["xla", "onnxruntime"], "Runtimes of the engine's programs."),
    "precisions": (flags.DEFINE_list, ["fp32", "auto"], "Engine precisions, each on every runtime "
                   "that runs it (see --precision)."),
    "budget": (flags.DEFINE_string, "", "FLOPs budget ('2x' reduction, '0.4gflops' per example), "
               "calibrated on the run's held-out training examples; '': the run's own rule."),
    "budgets": (flags.DEFINE_list, ["1.5x", "2x", "2.5x"], "FLOPs budgets ('2x', '0.4gflops'), "
                "each calibrated on the run's held-out training examples."),
    "rule": (flags.DEFINE_string, "router", "A SHARCS run: the rule that meets the budget "
             f"({', '.join(routing.RULES)}); an early-exit run has one, '{EXIT_RULE}'."),
    "rules": (flags.DEFINE_list, ["router"], "A SHARCS run: the rules that meet each budget "
              f"({', '.join(routing.RULES)}); an early-exit run has one, '{EXIT_RULE}'."),
    "signal": (flags.DEFINE_enum, "", "The confidence a cascade escalates or an exit leaves on; "
               "'': max_prob for SHARCS, entropy (DeeBERT's) for early exit.",
               ["", *routing.CONFIDENCE_SIGNALS]),
    "threads": (flags.DEFINE_integer, 0, "PyTorch and ONNX Runtime intra-op threads; 0: every "
                "usable CPU (XLA sizes its own pool to the machine)."),
}


def define_flags(*names: str, required: Sequence[str] = (), **defaults: Any) -> None:
  """Declares the shared flags `names` (with these `defaults` in place of the shared ones) as
  the calling benchmark's own, so that its --help lists them."""
  caller = sys._getframe(1).f_globals["__name__"]
  module = sys.argv[0] if caller == "__main__" else caller  # as absl names a program's flags
  for name in names:
    define, default, help_text, *values = SHARED_FLAGS[name]
    default = defaults.get(name, default)
    if values:
      define(name, default, values[0], help_text, module_name=module)
    else:
      define(name, default, help_text, module_name=module)
  if required:
    flags.mark_flags_as_required(list(required))


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
  """The CPU model and the instruction-set flags that decide the int8 and bf16 kernels."""
  fields: dict[str, str] = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's
  present = set(fields.get("flags", "").split())
  return {"model": fields.get("model name") or platform.processor() or "unknown",
          "flags": {f: f in present for f in CPU_FLAGS},
          "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}


def cpu_line(cpu: dict) -> str:
  """`cpu_info` in words, for a report's notes: every number is named with its CPU."""
  flags_on = ", ".join(f for f, on in cpu["flags"].items() if on) or "none of " + ", ".join(
      cpu["flags"])
  return f"{cpu['model']}, {cpu['usable_cpus']} usable CPUs, flags {flags_on}"


def dev_split(task: str, data_dir: str | None, limit: int = 0) -> glue.Split:
  """A task's dev texts and labels, found as every benchmark finds them (no run needed)."""
  return glue.load_split(task, "dev", glue.resolve_data_dir(data_dir), limit=limit)


def threads() -> int:
  """--threads, 0 resolved to every usable CPU."""
  return FLAGS.threads or len(os.sched_getaffinity(0))


# --- the engine and what differs by kind -------------------------------------------------------

def open_engine(run: Run, *, runtime: str = "xla", precision: str = "fp32", threads: int = 0,
                batch_buckets: Sequence[int] = dispatch.BATCH_BUCKETS,
                exit_layers: Sequence[int] | None = None) -> Engine:
  """The run's engine over every route (SHARCS: each width; an early exit: each exit, or those
  after `exit_layers`), under the model's default rule; a setting its kind refuses is a usage
  error (one line)."""
  try:
    engine = Engine(run.model, run.params, length_buckets=run.length_buckets,
                    batch_buckets=batch_buckets, tokenizer=run.tokenizer, task=run.task,
                    cache_dir=os.path.join(run.workdir, "executables"), precision=precision,
                    runtime=runtime, threads=threads, exit_layers=exit_layers)
  except ValueError as e:
    raise app.UsageError(f"{run.workdir}: {e}")
  engine.trained = run
  return engine


def calibration_data(run: Run) -> batching.Encoded:
  """The run's held-out training examples, which budgets are calibrated on; a usage error where
  it held none back."""
  try:
    (data,) = run.encoded("calibration")
  except ValueError as e:
    raise app.UsageError(str(e))
  return data


def checked_budgets(names: Sequence[str], special: Sequence[str] = ()) -> list[str]:
  """--budget(s) as given, each a budget `routing.parse_budget` reads (or one of `special`)."""
  for name in names:
    if name not in special:
      try:
        routing.parse_budget(name)
      except ValueError as e:
        raise app.UsageError(str(e))
  return list(names)


def calibrated(engine: Engine, budget: str, data: batching.Encoded, rule: str, signal: str = "",
               **options: Any) -> Any:
  """`engine.calibrate` with the rule named as reports name it (`EXIT_RULE` is the exit rule)."""
  return engine.calibrate(budget, data, rule="router" if rule == EXIT_RULE else rule,
                          signal=signal, **options)


def own_rule(engine: Engine, rule: str, signal: str) -> Any:
  """The rule a run serves with no budget given: the one kept with a SHARCS checkpoint, else (an
  early exit) its config's budget (2x where it has none) calibrated with `rule`."""
  run = engine.trained
  if run.rule is not None:
    return run.rule
  budget = run.config.routing.budget or "2x"
  return calibrated(engine, budget, calibration_data(run), rule, signal)


def full_width_program(engine: Engine, threads: int) -> Callable[[batching.Encoded], np.ndarray]:
  """A SHARCS model's whole width as one program (no router, no parts) on the engine's runtime
  and precision: probabilities [N, C], rows batched as the engine batches them."""
  params = engine.variables["params"]
  cache_dir = os.path.join(engine.workdir, "executables")
  if engine.runtime == "xla":
    programs = Programs(engine.model, params, batch_buckets=engine.batch_buckets,
                        length_buckets=engine.length_buckets, kinds=("forward",),
                        cache_dir=cache_dir)
    variables = {"params": params}
    call = lambda size, length, *inputs: programs("forward", 1.0, size, length)(variables,
                                                                                *inputs)
  else:
    from sharcs_jax.serve.onnx.programs import OnnxPrograms  # the serve extra, only here

    call = OnnxPrograms(engine.model, params, precision=engine.precision, full_width=True,
                        cache_dir=cache_dir).full_width_call(threads)
  return lambda data: dispatch.run_each_row(
      call, data.input_ids, data.token_type_ids, data.lengths, columns=engine.model.num_classes,
      program_lengths=engine.program_lengths, batch_buckets=engine.batch_sizes)


def full_depth_program(engine: Engine, threads: int) -> Callable[[batching.Encoded], np.ndarray]:
  """An early-exit model's every layer and last exit as one program, on the engine's runtime and
  precision: probabilities [N, C]."""
  full = Engine.from_run(engine.trained, exit_layers=[engine.model.encoder.num_layers],
                         batch_buckets=engine.batch_buckets, runtime=engine.runtime,
                         precision=engine.precision, threads=threads)
  return lambda data: full.run(data).probabilities


def fixed_full_width(engine: Engine) -> Engine:
  """Every row at full width through the engine's own stages (the prefix, then the full part)."""
  return engine.with_rule(routing.Fixed(len(engine.widths) - 1, budget="1x"))


@dataclasses.dataclass(frozen=True)
class Kind:
  """What a benchmark says or does differently for a SHARCS and an early-exit run: the names of
  its paths and report keys, its rules, the flags it has not, and the whole model as one program
  that the engine is timed against."""

  model: str  # as reports name it
  engine: str  # the routed engine, in a report
  engine_path: str  # ... in a serving path's name
  full: str  # the whole model (`full_program`), in a report and a path's name
  share_key: str  # where a report gives the share of rows per route
  rules: tuple[str, ...]  # the rules --rule(s) may name
  signal: str  # the default confidence signal
  baseline_budget: str  # a server's budget that serves `full` ('' : the model's default rule)
  refused_flags: tuple[str, ...]  # benchmark flags this kind has no use for
  full_program: Callable[[Engine, int], Callable[[batching.Encoded], np.ndarray]]
  staged_full: Callable[[Engine], Engine] | None  # the whole model through the engine's stages
  staged_full_name: str  # ... by name
  routes_by_depth: bool  # rows leave at an exit: report exit layers and the length calibration

  def route_figures(self, predictions: Predictions, names: Sequence[str]) -> dict:
    """Where the rows went: the share per route, and for exits the mean exit layer and the
    share that left at a narrow stage."""
    figures = {self.share_key: predictions.share_per_route(names)}
    if self.routes_by_depth:
      figures |= {"mean_exit_layer": float(predictions.exit_layers.mean()),
                  "narrow_share": float(np.mean(predictions.widths < 1.0))}
    return figures

  def describe(self, engine: Engine) -> dict:
    """The model's routes for a report's header."""
    if not self.routes_by_depth:
      return {"widths": list(engine.widths), "router_layer": engine.model.router_layer}
    return {"exit_pooling": engine.model.pooling, "exit_layers": list(engine.exit_layers),
            "stage_widths": list(engine.stage_widths)}


SHARCS = Kind(model="sharcs", engine="SHARCS engine", engine_path="engine", full="full width",
              share_key="share_per_width", rules=routing.RULES, signal="max_prob",
              baseline_budget="1x", refused_flags=("by_length", "exit_layers"),
              full_program=full_width_program, staged_full=fixed_full_width,
              staged_full_name="prefix+part full width", routes_by_depth=False)
EARLY_EXIT = Kind(model="early_exit", engine="early-exit engine", engine_path="exit engine",
                  full="full depth", share_key="share_per_exit", rules=(EXIT_RULE,),
                  signal="entropy", baseline_budget="", refused_flags=("start_budget",),
                  full_program=full_depth_program, staged_full=None, staged_full_name="",
                  routes_by_depth=True)


def kind_of(engine: Engine) -> Kind:
  """The one place a benchmark reads the model's kind, with the flags it was given checked
  against it: a flag the kind has no use for is a usage error."""
  kind = SHARCS if engine.layout.by_width else EARLY_EXIT
  given = [f"--{name}" for name in kind.refused_flags if name in FLAGS and FLAGS[name].present]
  if given:
    raise app.UsageError(f"{engine.workdir} holds a {kind.model} model: {', '.join(given)} "
                         "applies to the other kind of run")
  return kind


def checked_rules(kind: Kind, flag: str) -> list[str]:
  """The rules --rule or --rules names, checked against the run's kind (an early-exit run's
  one rule where the flag is not given)."""
  value = FLAGS[flag].value
  asked = list(value) if isinstance(value, list) else [value]
  if not FLAGS[flag].present and len(kind.rules) == 1:
    return list(kind.rules)
  wrong = [rule for rule in asked if rule not in kind.rules]
  if wrong or not asked:
    raise app.UsageError(f"--{flag}={','.join(asked)}: a {kind.model} run is routed by "
                         f"{' or '.join(kind.rules)}")
  return asked


def route_costs(engine: Engine, data: batching.Encoded) -> np.ndarray:
  """GFLOPs [R, N] of each row leaving at each route (that stage and every stage it reads)."""
  answering = [stage.answers for stage in engine.stages]
  return leave_costs(engine.stages, engine.stage_flops)[answering][:, data.bucket_of] / 1e9


def most_reduction(engine: Engine, data: batching.Encoded) -> float:
  """The largest FLOPs reduction a rule reaches on `data`: every row at its cheapest route."""
  return float(engine.full_gflops(data).mean() / route_costs(engine, data).min(0).mean())


def full_predictions(engine: Engine, probabilities: np.ndarray,
                     data: batching.Encoded) -> Predictions:
  """The whole model's answers as the engine's would read: every row at full width and depth."""
  last = engine.route_names()[-1]  # the full width, or the last full-width exit
  n = len(probabilities)
  return Predictions(labels=probabilities.argmax(-1).astype(np.int32),
                     probabilities=probabilities, widths=np.ones(n, np.float32),
                     exit_layers=np.full(n, engine.model.encoder.num_layers, np.int32),
                     gflops=engine.full_gflops(data), routes=(last,) * n,
                     by_width=engine.layout.by_width)


def metric_columns(metrics: Sequence[str]) -> list[str]:
  """A task's metrics as table columns: "accuracy", "F1"."""
  return [name if name == "accuracy" else name.upper() for name in metrics]


def shares_line(shares: dict[str, float]) -> str:
  return ", ".join(f"{name}: {100 * share:.1f}%" for name, share in shares.items())


# --- timing and reports ------------------------------------------------------------------------

def time_side_by_side(candidates: dict[str, Callable[[], object]], rounds: int,
                      warmup: int = 3, progress: bool = True) -> dict[str, np.ndarray]:
  """Seconds per call of each candidate, measured in interleaved rounds.

  Interleaving spreads the machine's background noise over all candidates alike, so their
  ratios hold even when absolute times drift. The order is shuffled every round: a candidate
  that always ran right after PyTorch would pay for its OpenMP threads still spinning.
  """
  order = np.random.default_rng(0)
  for fn in candidates.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in candidates}
  start = time.time()
  for r in range(rounds):
    for i in order.permutation(len(candidates)):
      name, fn = list(candidates.items())[i]
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    if progress and (time.time() - start > 10 or r == rounds - 1):
      print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
      start = time.time()
  return {name: np.asarray(t) for name, t in times.items()}


def classification(labels: np.ndarray, data: batching.Encoded, metrics: Sequence[str]) -> dict:
  return evaluate.classification_metrics(labels, data.labels, tuple(metrics))


def write_outputs(out_dir: str, name: str, data: dict, title: str, header: list[str],
                  rows: list[list], notes: str = "") -> None:
  os.makedirs(out_dir, exist_ok=True)
  report.write_json(os.path.join(out_dir, f"{name}.json"), data)
  report.write_atomic(os.path.join(out_dir, f"{name}.md"),
                      f"# {title}\n\n{notes}\n\n" + report.markdown_table(header, rows))


def print_report(out_dir: str, name: str) -> None:
  print(open(os.path.join(out_dir, f"{name}.md")).read())


def plot_width_mixture(ax, points: list[tuple[float, float]], reference_gflops: float,
                       color: str) -> None:
  """Joins fixed-width points (GFLOPs, accuracy %) by what sending a share of the inputs to each of
  two neighbours gives: straight in GFLOPs, so a curve against the reduction axis. The line a
  router must beat; drawn straight against the reduction it would lie too high in between."""
  points = sorted(points)
  share = np.linspace(0.0, 1.0, 51)
  for (g0, a0), (g1, a1) in zip(points, points[1:]):
    ax.plot(reference_gflops / (g0 + share * (g1 - g0)), a0 + share * (a1 - a0), "--",
            color=color, linewidth=1)


def save_accuracy_plot(fig, ax, title: str, path: str, baseline: str = "full width") -> None:
  """Finishes an accuracy-against-FLOPs-reduction figure the way every benchmark draws it."""
  ax.set_xlabel(f"FLOPs reduction vs {baseline} (dev average, XLA cost analysis)")
  ax.set_ylabel("dev accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  report.save_figure(fig, path)
