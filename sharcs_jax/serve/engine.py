"""The inference engine: one model's stage layout on precompiled programs, under a rule.

Every model kind is a layout of stages over the one dispatch core (`layout.py`): SHARCS runs the
prefix and router once per input and each input's routed width (escalating under the cascade);
an early-exit model runs its layers in stages, each input leaving at the first exit it is sure
at; a depth-and-width model adds narrow stages after layer K. Which layout a model has is decided
here, once (`_build`); everything after it (predict, serve, export, the benchmarks) asks the
engine, and every answer is one `layout.Predictions` (labels, probabilities, each row's route and
GFLOPs). Programs are compiled (or loaded from disk, see `programs.py`) when the engine is built;
serving never traces or compiles.

FLOPs per example are the XLA cost analysis of the float32 programs at the example's length
bucket, summed over the stages it ran (`Layout.stage_flops`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from sharcs_jax.data import batching, glue
from sharcs_jax.data.inputs import text_rows
from sharcs_jax.errors import RunError
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.run import Run, load_run
from sharcs_jax.serve import dispatch
from sharcs_jax import evaluate
from sharcs_jax.serve.exit_layout import (NEVER_SURE, calibration_split, layer_spans,
                                          stage_layout)
from sharcs_jax.serve.layout import Layout, Predictions, width_layout
from sharcs_jax.serve.layout import run as run_layout
from sharcs_jax.serve.precision import COMPUTE_DTYPES
from sharcs_jax.serve.precision import resolve as resolve_precision
from sharcs_jax.serve.programs import (ProgramRunner, Programs, StageProgram,
                                      StageProgramRunner)
from sharcs_jax.serve.routing import (Budget, Cascade, ExitCascade, Rule, calibrate_depth_width,
                                      calibrate_exits, parse_budget)

Text = str | Sequence[str]
SHARCS_RULES = ("router", "cascade", "router+cascade")


def encode_texts_for(task: glue.Task | None, tokenizer: Any, length_buckets: Sequence[int],
                     texts: Sequence[Text], labels: Sequence[int] | None = None
                     ) -> batching.Encoded:
  """An engine's inputs tokenised; a wrong number of fields is an error naming the input."""
  if tokenizer is None or task is None:
    raise ValueError("this engine has no tokenizer and task: build it with from_workdir, or "
                     "pass tokenizer= and task=")
  rows = text_rows(texts, task.text_columns, task.name)
  return batching.encode_texts(rows, tokenizer, tuple(length_buckets), labels)


@dataclasses.dataclass(frozen=True)
class _Built:
  """What `_build` makes of a model for one runtime."""

  model: SharcsModel | EarlyExitModel  # as its XLA programs compute
  programs: Programs  # the XLA programs (batch 1 alone where another runtime serves)
  runner: Any  # the serving runtime's runner (SHARCS: prefix and parts; else stages)
  layout: Layout
  stage_programs: tuple[StageProgram, ...]  # which program each stage of the layout runs
  onnx: Any = None  # the ONNX programs, on "onnxruntime"


def _build(model: SharcsModel | EarlyExitModel, params: Any, *, length_buckets: Sequence[int],
           batch_buckets: Sequence[int], cache_dir: str | None, runtime: str, precision: str,
           threads: int, exit_layers: Sequence[int] | None) -> _Built:
  """The one place a model's kind decides its programs and layout."""
  if isinstance(model, EarlyExitModel):
    return _exit_stages(model, params, length_buckets, batch_buckets, cache_dir, runtime,
                        precision, threads, exit_layers)
  if exit_layers is not None:
    raise ValueError("exit_layers apply to an early-exit model")
  return _width_parts(model, params, length_buckets, batch_buckets, cache_dir, runtime,
                      precision, threads)


def _width_parts(model: SharcsModel, params: Any, length_buckets: Sequence[int],
                 batch_buckets: Sequence[int], cache_dir: str | None, runtime: str,
                 precision: str, threads: int) -> _Built:
  """A SHARCS model: the prefix with the router, then each width's adaptive part. FLOPs are the
  float32 XLA programs' whatever runs them (XLA would also count a bf16 program's conversions),
  so reductions compare across precisions and runtimes."""
  xla_precision = precision if runtime == "xla" else "fp32"
  model = model.clone(compute_dtype=COMPUTE_DTYPES[xla_precision])
  fp32 = model.clone(compute_dtype="float32")
  onnx = None
  if runtime == "xla":
    programs = Programs(model, params, batch_buckets=batch_buckets,
                        length_buckets=length_buckets, cache_dir=cache_dir)
    counted = programs if precision == "fp32" else Programs(
        fp32, params, batch_buckets=batch_buckets[:1], length_buckets=length_buckets,
        cache_dir=cache_dir)
    runner: Any = ProgramRunner(programs, {"params": params})
  else:
    from sharcs_jax.serve.onnx.programs import OnnxPrograms  # the serve extra, only here

    # The XLA programs at batch 1 only: the FLOPs table, and the model's shapes for evaluation.
    programs = counted = Programs(fp32, params, batch_buckets=batch_buckets[:1],
                                  length_buckets=length_buckets, cache_dir=cache_dir)
    onnx = OnnxPrograms(model, params, precision=precision, cache_dir=cache_dir)
    runner = onnx.runner(threads)
  prefix = counted.prefix_flops_row()
  layout = width_layout(model.widths, model.router_layer, model.encoder.num_layers, prefix,
                        counted.flops_table() - prefix)
  stage_programs = (StageProgram("prefix", None, None),) + tuple(
      StageProgram("adaptive", w, None) for w in model.widths)
  return _Built(model, programs, runner, layout, stage_programs, onnx)


def _exit_stages(model: EarlyExitModel, params: Any, length_buckets: Sequence[int],
                 batch_buckets: Sequence[int], cache_dir: str | None, runtime: str,
                 precision: str, threads: int, exit_layers: Sequence[int] | None) -> _Built:
  """An early-exit model: its layers in stages ending at `exit_layers` (default every layer),
  with a depth-and-width model's narrow stages after layer K."""
  spans = layer_spans(model.encoder.num_layers, exit_layers)
  stage_programs, stages, narrow_first, narrow_count = stage_layout(model, spans)
  programs = Programs(model, params,
                      batch_buckets=batch_buckets if runtime == "xla" else batch_buckets[:1],
                      length_buckets=length_buckets,
                      kinds=("stage", "narrow") if narrow_count else ("stage",),
                      spans=spans, cache_dir=cache_dir)
  onnx = None
  if runtime == "xla":
    runner: Any = StageProgramRunner(programs, {"params": params}, stage_programs)
  else:
    from sharcs_jax.serve.onnx.programs import OnnxPrograms  # the serve extra, only here

    onnx = OnnxPrograms(model, params, precision=precision, cache_dir=cache_dir,
                        stages=stage_programs)
    runner = onnx.runner(threads)
  layout = Layout(tuple(stages), tuple(p.width or 1.0 for p in stage_programs),
                  tuple(p.span[1] + 1 for p in stage_programs),
                  programs.stage_flops_table(stage_programs), narrow_first=narrow_first,
                  narrow_count=narrow_count)
  return _Built(model, programs, runner, layout, tuple(stage_programs), onnx)


class Engine:
  """Inference for one trained model (any layout) on precompiled programs, under a rule."""

  def __init__(self, model: SharcsModel | EarlyExitModel, params: Any, *,
               length_buckets: Sequence[int],
               batch_buckets: Sequence[int] = dispatch.BATCH_BUCKETS, tokenizer: Any = None,
               task: glue.Task | None = None, cache_dir: str | None = None,
               rule: Rule | Cascade | ExitCascade | None = None, precision: str = "fp32",
               runtime: str = "xla", threads: int = 0,
               exit_layers: Sequence[int] | None = None):
    """`precision`: the matmuls' compute dtype, "fp32" or "bf16" on `runtime` "xla" (an
    early-exit model: fp32), "fp32" or "int8" on "onnxruntime" ("auto": the fastest the CPU
    runs natively), with `threads` intra-op threads (0: every usable core). `rule`: how rows
    are routed (default: SHARCS's router argmax; an early-exit model's full depth).
    `exit_layers`: an early-exit model's stage ends (default every layer)."""
    if isinstance(model, EarlyExitModel) and runtime == "xla" and precision not in ("fp32",
                                                                                      "auto"):
      raise ValueError(f"precision {precision!r}: an early-exit model runs fp32 on XLA (or fp32 "
                       "and int8 on ONNX Runtime)")
    self.runtime = runtime
    self.precision = ("fp32" if isinstance(model, EarlyExitModel) and runtime == "xla" else
                      resolve_precision(precision, jax.default_backend(), runtime=runtime))
    self.variables = {"params": params}
    self.length_buckets = tuple(length_buckets)
    self.batch_buckets = tuple(batch_buckets)
    self.batch_sizes = dispatch.batch_sizes_for(runtime, batch_buckets)  # what groups run at
    self.program_lengths = dispatch.lengths_for(runtime, length_buckets)  # and at which lengths
    self.block_size = dispatch.block_rows(self.batch_sizes)
    self.tokenizer, self.task = tokenizer, task
    built = _build(model, params, length_buckets=self.length_buckets,
                   batch_buckets=self.batch_buckets, cache_dir=cache_dir, runtime=runtime,
                   precision=self.precision, threads=threads, exit_layers=exit_layers)
    self.model, self.programs, self.runner, self.layout, self.onnx = (
        built.model, built.programs, built.runner, built.layout, built.onnx)
    self.stage_programs = built.stage_programs
    self.trained: Run | None = None  # the training run, when built from one
    self.rule = rule or (Rule() if self.layout.by_width else self.layout_rule(NEVER_SURE))
    self._check_rule(self.rule)

  # What the layout says, by the names callers read.
  @property
  def widths(self) -> tuple[float, ...]:
    return self.layout.widths

  @property
  def stages(self) -> tuple[dispatch.Stage, ...]:
    return self.layout.stages

  @property
  def stage_flops(self) -> np.ndarray:
    return self.layout.stage_flops

  @property
  def exit_layers(self) -> tuple[int, ...]:
    return self.layout.stage_layers

  @property
  def stage_widths(self) -> tuple[float, ...]:
    return self.layout.stage_widths

  @property
  def narrow_first(self) -> int:
    return self.layout.narrow_first

  @property
  def narrow_count(self) -> int:
    return self.layout.narrow_count

  @property
  def flops(self) -> np.ndarray:
    """A SHARCS model's FLOPs per example [m, length buckets] at each width, prefix included."""
    return self.layout.width_flops()

  @property
  def prefix_flops(self) -> np.ndarray:
    """A SHARCS model's prefix and router FLOPs per example [length buckets]."""
    return self.layout.stage_flops[0]

  @property
  def workdir(self) -> str | None:
    return self.trained.workdir if self.trained else None

  def route_names(self) -> list[str]:
    """Each route a row may take, by name (`Layout.route_names`)."""
    return self.layout.route_names()

  @classmethod
  def from_run(cls, run: Run, *, batch_buckets: Sequence[int] = dispatch.BATCH_BUCKETS,
               cache_dir: str | None = None, budget: str = "", rule: Any = "router",
               signal: str = "", start_budget: str = "", by_length: bool = False,
               precision: str = "fp32", runtime: str = "xla", threads: int = 0,
               exit_layers: Sequence[int] | None = None) -> "Engine":
    """The kept model of a training run; programs are stored under `workdir/executables`.

    Routing is the rule kept with the run (SHARCS: its checkpoint's; an early-exit model: every
    row at full depth, as one program), or with `budget` ("2.5x", "0.4gflops") a rule calibrated
    now on the run's calibration split (its held-out training examples): SHARCS's rule named by
    `rule` (`SHARCS_RULES`; `start_budget`: router+cascade's own), an early-exit model's exit
    threshold (per length bucket with `by_length`); or `rule` itself where it is a rule object
    (an early-exit model's then over every layer, unless `exit_layers`). `signal`: the confidence a row escalates or
    exits on (default max_prob for SHARCS, entropy for exits). A budget is calibrated on the
    runtime's own probabilities. Settings the run's kind has not are one-line `RunError`s.
    """
    exits = isinstance(run.model, EarlyExitModel)
    given = None if isinstance(rule, str) else rule  # a rule object, applied as it is
    if given is None:
      _check_settings(run.workdir, exits, rule, start_budget, precision)
      if rule != "router" and not budget:
        raise ValueError(f"the {rule!r} rule is calibrated to a budget: give one, e.g. "
                         "budget='2x'")
    if exits and not budget and given is None and exit_layers is None:
      exit_layers = [run.model.encoder.num_layers]  # the full depth, as one program
    engine = cls(run.model, run.params, length_buckets=run.length_buckets,
                 batch_buckets=batch_buckets, tokenizer=run.tokenizer, task=run.task,
                 cache_dir=cache_dir or os.path.join(run.workdir, "executables"),
                 rule=given or (None if budget or exits else run.rule), precision=precision,
                 runtime=runtime, threads=threads, exit_layers=exit_layers)
    engine.trained = run
    if budget:
      data = engine.encode_split(calibration_split(run.config, run.workdir))
      engine.rule = engine.calibrate(budget, data, rule=rule, signal=signal,
                                     start_budget=start_budget, by_length=by_length)
      logging.info("Routing to budget %s: %s on %d calibration examples", budget,
                   engine.rule.to_json(), len(data))
    return engine

  @classmethod
  def from_workdir(cls, workdir: str, **options: Any) -> "Engine":
    """`from_run(load_run(workdir), **options)`."""
    return cls.from_run(load_run(workdir), **options)

  def layout_rule(self, threshold: float, narrow_threshold: float | None = None,
                  signal: str = "entropy") -> ExitCascade:
    """An early-exit model's `ExitCascade` over this engine's stages (its narrow ones where it
    has them; None skips them) at these thresholds."""
    layout = self.layout
    narrow = ((layout.narrow_first, layout.narrow_count, narrow_threshold)
              if layout.narrow_count else (0, 0, None))
    return ExitCascade(threshold, len(layout.stages), signal, "", 1.0, (), *narrow)

  def every_stage_rule(self) -> Cascade | ExitCascade:
    """A rule under which every row runs every stage: SHARCS's every width, narrowest first; an
    early-exit model's every exit, narrow ones included."""
    if self.layout.by_width:
      return Cascade(NEVER_SURE)
    return self.layout_rule(NEVER_SURE, NEVER_SURE)

  def _check_rule(self, rule: Any) -> None:
    """ValueError unless `rule` is laid over this engine's stages."""
    if self.layout.by_width:
      if isinstance(rule, ExitCascade):
        raise ValueError("an exit rule routes an early-exit model, not SHARCS widths")
      return
    if not isinstance(rule, ExitCascade):
      raise ValueError(f"an early-exit model is routed by an exit rule, not {rule!r}")
    if rule.num_stages != len(self.layout.stages):
      raise ValueError(f"the rule has {rule.num_stages} stages, the engine "
                       f"{len(self.layout.stages)}")
    if rule.narrow_count != self.layout.narrow_count or (
        self.layout.narrow_count and rule.narrow_first != self.layout.narrow_first):
      raise ValueError(f"the rule has {rule.narrow_count} narrow stages from stage "
                       f"{rule.narrow_first}, the engine {self.layout.narrow_count} from "
                       f"{self.layout.narrow_first}")

  def with_rule(self, rule: Any) -> "Engine":
    """This engine under another rule, sharing its compiled programs (a budget sweep loads
    them once, not once per budget)."""
    self._check_rule(rule)
    routed = copy.copy(self)
    routed.rule = rule
    return routed

  def with_params(self, params: Any) -> "Engine":
    """This engine on other parameters of the same shapes, on its compiled XLA programs: what
    training evaluates each epoch through, so that dev results are what the engine serves."""
    if self.runtime != "xla":
      raise ValueError(f"an engine on {self.runtime} holds its parameters in its programs")
    swapped = copy.copy(self)
    swapped.variables = {"params": params}
    swapped.runner = copy.copy(self.runner)
    swapped.runner.variables = swapped.variables
    return swapped

  def every_stage(self, data: batching.Encoded) -> np.ndarray:
    """Class probabilities at each answering stage [R, N, C], in `route_names` order, every row
    running every stage: a SHARCS model's at each width, an early-exit model's at each exit."""
    _, out = self._run(data, self.every_stage_rule())
    return np.stack([outputs[0] for outputs, stage in zip(out.outputs, self.stages)
                     if stage.answers])

  def calibrate(self, budget: Budget | str, data: batching.Encoded, rule: str = "router",
                signal: str = "", start_budget: Budget | str = "", by_length: bool = False,
                every_stage: np.ndarray | None = None, narrow: bool = True) -> Any:
    """A rule that meets `budget` on `data` (inputs the model did not train on); not applied.

    SHARCS: the rule named `rule`, its cascade on `signal` (default max_prob). An early-exit
    model: the exit threshold on `signal` (default entropy), per length bucket with
    `by_length`; a depth-and-width model's two thresholds searched jointly on `data`'s labels
    (or with `narrow` False its full-width exits alone). `every_stage`: `data`'s probabilities
    at every stage, where the caller has them."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    if self.layout.by_width:
      start_budget = parse_budget(start_budget) if isinstance(start_budget, str) and \
          start_budget else start_budget or None
      return evaluate.calibrate_rule(self.programs, self.variables["params"], data,
                                     self.batch_buckets[-1], budget, rule, signal or "max_prob",
                                     start_budget, runner=self.runner,
                                     program_lengths=self.program_lengths)
    signal = signal or "entropy"
    every_stage = self.every_stage(data) if every_stage is None else every_stage
    stage_flops = self.layout.stage_flops[:, data.bucket_of].T
    if self.layout.narrow_count and narrow:
      if by_length:
        raise ValueError("a depth-and-width model's thresholds are fitted over all lengths")
      return calibrate_depth_width(every_stage, stage_flops, data.labels, budget,
                                   self.layout.narrow_first, self.layout.narrow_count,
                                   signal=signal)[0]
    return calibrate_exits(every_stage, stage_flops, budget, signal,
                           bucket_of=data.bucket_of if by_length else None,
                           num_buckets=len(self.length_buckets),
                           layout=self.layout_rule(0.0, signal=signal))

  def example_gflops(self, width: float, length: int) -> float:
    """GFLOPs of one example routed to `width` at padded length `length` (SHARCS)."""
    return self.programs.example_flops(width, length) / 1e9

  def full_gflops(self, data: batching.Encoded) -> np.ndarray:
    """Per-example GFLOPs [N] had every row run at full width and depth: the reduction's
    baseline."""
    return self.layout.full_flops()[data.bucket_of] / 1e9

  def encode(self, texts: Sequence[Text], labels: Sequence[int] | None = None) -> batching.Encoded:
    """Tokenised inputs; a wrong number of fields is an error naming the input."""
    return encode_texts_for(self.task, self.tokenizer, self.length_buckets, texts, labels)

  def encode_split(self, split: glue.Split) -> batching.Encoded:
    """A split of the run's data tokenised as training tokenised it."""
    (data,) = batching.encode_splits([split], self.tokenizer, self.length_buckets)
    return data

  def predict(self, texts: Sequence[Text]) -> Predictions:
    return self.run(self.encode(texts))

  def run(self, data: batching.Encoded, runner: Any = None) -> Predictions:
    """Predictions for every row of `data`, in row order. `runner` replaces the engine's own
    (a profiler wraps it to time each call)."""
    predictions, _ = self._run(data, self.rule, runner)
    return predictions

  def _run(self, data: batching.Encoded, rule: Any, runner: Any = None
           ) -> tuple[Predictions, dispatch.StagesRun]:
    if data.length_buckets != self.length_buckets:
      raise ValueError(f"inputs were bucketed to {data.length_buckets}, the engine was compiled "
                       f"for {self.length_buckets}")
    return run_layout(self.layout, runner or self.runner, rule, data.input_ids,
                      data.token_type_ids, data.lengths, length_buckets=self.length_buckets,
                      batch_sizes=self.batch_sizes, program_lengths=self.program_lengths,
                      num_classes=self.model.num_classes, block_size=self.block_size)


def _check_settings(workdir: str, exits: bool, rule: str, start_budget: str,
                    precision: str) -> None:
  """Settings that the run's model kind does not have: one line naming them."""
  if not exits:
    if rule not in SHARCS_RULES:
      raise RunError(f"--rule={rule}: a SHARCS run is routed by one of {list(SHARCS_RULES)}")
    return
  refused = [f"--{name}={value}" for name, value, allowed in (
      ("rule", rule, ("router", "exit")), ("start_budget", start_budget, ("",)),
      ("precision", precision, ("fp32", "auto", "int8")))
             if value not in allowed]
  if refused:
    raise RunError(f"{workdir} holds an early-exit model, served by its exit rule at fp32 (or "
                   f"int8 on ONNX Runtime): {', '.join(refused)} applies to SHARCS runs only")
