"""Inference engine: routed dispatch over ahead-of-time compiled programs.

For a list of texts (or text pairs) the engine tokenises into the length buckets, runs the prefix
and router once per input, groups the inputs by routed width and length bucket, runs each group on
that width's program and returns labels, probabilities and widths in the input order. Programs are
compiled (or loaded from disk, see `programs.py`) when the engine is built; serving never traces or
compiles.

FLOPs per example are the XLA cost-analysis FLOPs of the batch-1 programs at the example's length
bucket: prefix and router, plus the routed width's part. The width comes from a routing rule
(`routing.py`): the router's argmax, or argmax under a FLOPs budget calibrated on held-out inputs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from sharcs_jax.serve import dispatch, evaluate
from sharcs_jax.data import batching, glue
from sharcs_jax.data.inputs import text_rows
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.model.widths import width_label
from sharcs_jax.serve.precision import COMPUTE_DTYPES
from sharcs_jax.serve.precision import resolve as resolve_precision
from sharcs_jax.serve.programs import ProgramRunner, Programs
from sharcs_jax.serve.routing import Budget, Cascade, Rule, parse_budget
from sharcs_jax.run import Run, load_run

Text = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class Predictions:
  labels: np.ndarray  # int32 [N]
  probabilities: np.ndarray  # float32 [N, C]
  widths: np.ndarray  # float32 [N] the routed width
  gflops: np.ndarray  # float64 [N] per example: prefix + router + routed part

  def share_per_width(self, widths: Sequence[float]) -> dict[str, float]:
    """The share of inputs that ended at each of `widths`, keyed by width label (0 if none)."""
    return {width_label(w): float(np.mean(self.widths == w)) if len(self.widths) else 0.0
            for w in widths}


def encode_texts_for(task: glue.Task | None, tokenizer: Any, length_buckets: Sequence[int],
                     texts: Sequence[Text], labels: Sequence[int] | None = None
                     ) -> batching.Encoded:
  """An engine's inputs tokenised; a wrong number of fields is an error naming the input."""
  if tokenizer is None or task is None:
    raise ValueError("this engine has no tokenizer and task: build it with from_workdir, or "
                     "pass tokenizer= and task=")
  rows = text_rows(texts, task.text_columns, task.name)
  return batching.encode_texts(rows, tokenizer, tuple(length_buckets), labels)


class Engine:
  """SHARCS inference for one model and parameter tree, on precompiled programs."""

  def __init__(self, model: SharcsModel, params: Any, *, length_buckets: Sequence[int],
               batch_buckets: Sequence[int] = dispatch.BATCH_BUCKETS, tokenizer: Any = None,
               task: glue.Task | None = None, cache_dir: str | None = None,
               rule: Rule | Cascade = Rule(), precision: str = "fp32", runtime: str = "xla",
               threads: int = 0):
    self.runtime = runtime
    self.precision = resolve_precision(precision, jax.default_backend(), runtime=runtime)
    xla_precision = self.precision if runtime == "xla" else "fp32"
    model = model.clone(compute_dtype=COMPUTE_DTYPES[xla_precision])
    self.model = model
    self.params = {"params": params}
    self.length_buckets = tuple(length_buckets)
    self.batch_buckets = tuple(batch_buckets)
    self.batch_sizes = dispatch.batch_sizes_for(runtime, batch_buckets)  # what groups run at
    self.program_lengths = dispatch.lengths_for(runtime, length_buckets)  # and at which lengths
    self.widths = model.widths
    self.tokenizer = tokenizer
    self.task = task
    self.block_size = dispatch.block_rows(self.batch_sizes)
    # FLOPs are the float32 XLA programs' whatever runs them: the same arithmetic (XLA would also
    # count a bf16 program's conversions), so reductions compare across precisions and runtimes.
    fp32 = model.clone(compute_dtype="float32")
    if runtime == "xla":
      self.programs = Programs(model, params, batch_buckets=batch_buckets,
                               length_buckets=length_buckets, cache_dir=cache_dir)
      counted = self.programs if self.precision == "fp32" else Programs(
          fp32, params, batch_buckets=batch_buckets[:1], length_buckets=length_buckets,
          cache_dir=cache_dir)
      self.runner: dispatch.Runner = ProgramRunner(self.programs, self.params)
    else:
      from sharcs_jax.serve.onnx_programs import OnnxPrograms  # the serve extra, only here

      # The XLA programs at batch 1 only: the FLOPs table, and the model's shapes for evaluation.
      self.programs = counted = Programs(fp32, params, batch_buckets=batch_buckets[:1],
                                         length_buckets=length_buckets, cache_dir=cache_dir)
      self.onnx = OnnxPrograms(model, params, precision=self.precision, cache_dir=cache_dir)
      self.runner = self.onnx.runner(threads)
    self.flops = counted.flops_table()  # [m, length buckets]
    self.prefix_flops = counted.prefix_flops_row()  # [length buckets]
    self.rule = rule
    self.trained: Run | None = None  # the training run, when built from one

  @classmethod
  def from_run(cls, run: Run, *, batch_buckets: Sequence[int] = dispatch.BATCH_BUCKETS,
               cache_dir: str | None = None, budget: str = "", rule: str = "router",
               signal: str = "max_prob", start_budget: str = "", precision: str = "fp32",
               runtime: str = "xla", threads: int = 0) -> "Engine":
    """The kept model of a training run; programs are stored under `workdir/executables`.

    Routing is the rule kept with the run's checkpoint, or with `budget` ("2.5x", "0.4gflops") the
    rule named by `rule` (`routing.RULES`) calibrated now on the run's calibration split (its
    held-out training examples). `precision` ("fp32", "bf16", "auto": bf16 where the CPU has
    fast bf16) is the matmuls' compute dtype on `runtime` "xla"; on "onnxruntime" it is "fp32" or
    "int8" ("auto": int8 where the CPU has an int8 dot product), with `threads` intra-op threads
    (0: every usable core). A budget is calibrated on the runtime's own probabilities.
    """
    if rule != "router" and not budget:
      raise ValueError(f"the {rule!r} rule is calibrated to a budget: give one, e.g. budget='2x'")
    engine = cls(run.model, run.params, length_buckets=run.length_buckets,
                 batch_buckets=batch_buckets, tokenizer=run.tokenizer, task=run.task,
                 cache_dir=cache_dir or os.path.join(run.workdir, "executables"),
                 rule=Rule() if budget else run.rule, precision=precision, runtime=runtime,
                 threads=threads)
    engine.trained = run
    if budget:
      (calibration,) = run.encoded("calibration")
      engine.rule = engine.calibrate(budget, calibration, rule, signal, start_budget)
      logging.info("Routing to budget %s: %s, %.3fx on %d calibration examples", budget,
                   engine.rule.to_json(), engine.rule.calibration_reduction, len(calibration))
    return engine

  @classmethod
  def from_workdir(cls, workdir: str, **options: Any) -> "Engine":
    """`from_run(load_run(workdir), **options)`."""
    return cls.from_run(load_run(workdir), **options)

  def calibrate(self, budget: Budget | str, data: batching.Encoded, rule: str = "router",
                signal: str = "max_prob", start_budget: Budget | str = "") -> Rule | Cascade:
    """The named rule calibrated to `budget` on `data` (inputs the model did not train on);
    not applied."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    start_budget = parse_budget(start_budget) if isinstance(start_budget, str) and start_budget \
        else start_budget or None
    return evaluate.calibrate_rule(self.programs, self.params["params"], data,
                                   self.batch_buckets[-1], budget, rule, signal, start_budget,
                                   runner=self.runner, program_lengths=self.program_lengths)

  def example_gflops(self, width: float, length: int) -> float:
    """GFLOPs of one example routed to `width` at padded length `length`."""
    return self.programs.example_flops(width, length) / 1e9

  def full_width_gflops(self, data: batching.Encoded) -> np.ndarray:
    """Per-example GFLOPs [N] had every example run at full width: the reduction's baseline."""
    return self.flops[-1, data.bucket_of] / 1e9

  def encode(self, texts: Sequence[Text], labels: Sequence[int] | None = None) -> batching.Encoded:
    """Tokenised inputs; a wrong number of fields is an error naming the input."""
    return encode_texts_for(self.task, self.tokenizer, self.length_buckets, texts, labels)

  def predict(self, texts: Sequence[Text]) -> Predictions:
    return self.run(self.encode(texts))

  def run(self, data: batching.Encoded, runner: dispatch.Runner | None = None) -> Predictions:
    """Predictions for every row of `data`, in row order (through `dispatch.run_buckets`).

    `runner` replaces the engine's own (a profiler wraps it to time each call)."""
    if data.length_buckets != self.length_buckets:
      raise ValueError(f"inputs were bucketed to {data.length_buckets}, the engine was compiled "
                       f"for {self.length_buckets}")
    out = dispatch.run_buckets(
        runner or self.runner, data.input_ids,
        data.token_type_ids, data.lengths, length_buckets=self.length_buckets,
        batch_buckets=self.batch_sizes, num_widths=len(self.widths),
        num_classes=self.model.num_classes, rule=self.rule, width_flops=self.flops,
        prefix_flops=self.prefix_flops, program_lengths=self.program_lengths,
        block_size=self.block_size)
    return Predictions(labels=out.probabilities.argmax(-1).astype(np.int32),
                       probabilities=out.probabilities,
                       widths=np.asarray(self.widths, np.float32)[out.final],
                       gflops=out.flops / 1e9)


def route_labels(predictions: Any) -> list[str]:
  """What the engine chose for each row, as a metric label value: its width ("0.25") for a
  SHARCS model, the layer it exited after ("3", or "6 at width 0.5" from a depth-and-width
  model's narrow stage) for an early-exit model."""
  if hasattr(predictions, "exit_layers"):
    return [route_name(layer, w).removeprefix("layer ")
            for layer, w in zip(predictions.exit_layers, _exit_widths(predictions))]
  return [width_label(float(w)) for w in predictions.widths]


def route_detail(predictions: Any, row: int) -> dict[str, float | int]:
  """A row's route in a `"details": true` answer: its width, or the layer it exited after."""
  if hasattr(predictions, "exit_layers"):
    route = {"exit_layer": int(predictions.exit_layers[row])}
    width = float(_exit_widths(predictions)[row])
    return route if width == 1.0 else {**route, "width": width}  # a narrow stage's exit
  return {"width": float(predictions.widths[row])}


def route_name(exit_layer: int, width: float = 1.0) -> str:
  """An early-exit model's exit by name: "layer 3", or "layer 6 at width 0.5" for a
  depth-and-width model's narrow stage."""
  return f"layer {int(exit_layer)}" + ("" if width == 1.0 else f" at width {float(width):g}")


def _exit_widths(predictions: Any) -> np.ndarray:
  """The width each row's exit ran at (full width where the predictions do not say)."""
  widths = getattr(predictions, "widths", None)
  return np.ones(len(predictions.exit_layers)) if widths is None else widths
