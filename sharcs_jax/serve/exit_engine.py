"""Serving an early-exit model (DeeBERT / PABEE's network) through the one dispatch core.

The model's layers are cut into stages (by default one per layer, as DeeBERT checks every exit):
stage j runs its layers on the hidden states stage j - 1 returned and gives its exit's class
probabilities, and `routing.ExitCascade` lets a row leave at the first stage it is sure at. Each
stage is its own precompiled program per (batch, length) bucket (`programs.Programs`, kind
"stage"), so a row that leaves after layer 2 really runs two layers; FLOPs are the stages' XLA
cost analysis, summed over the stages a row ran. A budget ("2x") is met by calibrating the exit
threshold on the run's calibration split (held-out training examples).

A depth-and-width model (narrow `widths`) adds narrow stages per narrow width after the stage
that ends at layer K, the first reading its hidden states (and, with narrow exits, each next
narrow stage the one before): rows unsure there try the narrow exits in turn before going on at
full width (`routing.ExitCascade`'s narrow stages); its budget is met by a small
joint search over both thresholds (`routing.calibrate_depth_width`).
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
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.weights import resolve_model_dir
from sharcs_jax.serve import dispatch
from sharcs_jax.serve.engine import Text, encode_texts_for, route_name
from sharcs_jax.serve.exported import spans_of
from sharcs_jax.serve.precision import resolve as resolve_precision
from sharcs_jax.serve.programs import Programs, Span, StageProgram, StageProgramRunner
from sharcs_jax.serve.routing import (Budget, ExitCascade, calibrate_depth_width,
                                      calibrate_exits, parse_budget)

NEVER_SURE = 2.0  # a threshold no confidence reaches: every row runs every stage


@dataclasses.dataclass(frozen=True)
class ExitPredictions:
  labels: np.ndarray  # int32 [N]
  probabilities: np.ndarray  # float32 [N, C] at the exit each row left at
  exit_layers: np.ndarray  # int32 [N] that exit's layer, 1-based
  gflops: np.ndarray  # float64 [N] the stages each row ran
  widths: np.ndarray | None = None  # float32 [N] the width of that exit's layers (1.0, or narrow)

  def routes(self) -> list[str]:
    """Each row's exit by name (`engine.route_name`)."""
    widths = np.ones(len(self.exit_layers)) if self.widths is None else self.widths
    return [route_name(layer, w) for layer, w in zip(self.exit_layers, widths)]


def layer_spans(num_layers: int, exit_layers: Sequence[int] | None = None) -> tuple[Span, ...]:
  """Stages ending at each of `exit_layers` (1-based; default every layer; the last is always
  an exit)."""
  ends = sorted(set(exit_layers or range(1, num_layers + 1)) | {num_layers})
  if ends[0] < 1 or ends[-1] > num_layers:
    raise ValueError(f"exit layers {list(exit_layers)} must lie in 1..{num_layers}")
  return spans_of(ends)


def stage_layout(model: EarlyExitModel, spans: Sequence[Span]
                 ) -> tuple[list[StageProgram], list[dispatch.Stage], int, int]:
  """(the program of each stage, the stages as the dispatch core runs them, the first narrow
  stage's index, how many): the spans in order, and after the span ending at layer K each narrow
  width's stages (its `narrow_spans`, the first reading that span's hidden states, each next one
  the narrow stage before); the next full-width span reads layer K's too. Where no span ends at
  layer K (the full depth as one program) there are no narrow stages."""
  programs = [StageProgram("stage", None, span) for span in spans]
  stages = dispatch.chained_stages(len(spans))
  narrow = model.narrow_stages
  ends = [last + 1 for _, last in spans]
  if not narrow or model.width_layer not in ends:
    return programs, stages, len(spans), 0
  boundary = ends.index(model.width_layer)  # the span the narrow stages read
  first = boundary + 1
  programs[first:first] = [StageProgram("narrow", w, span) for w, span in narrow]
  narrow_stages = [dispatch.Stage(boundary if span[0] == model.width_layer else first + j - 1,
                                  answers=True) for j, (_, span) in enumerate(narrow)]
  stages = stages[:first] + narrow_stages + [
      dispatch.Stage(boundary if j == 0 else first + len(narrow) + j - 1, answers=True)
      for j in range(len(spans) - first)]
  return programs, stages, first, len(narrow)


def calibration_split(config: Any, workdir: str,
                      splits: tuple[glue.Split, ...] | None = None) -> glue.Split:
  """The run's held-out training examples that budgets are fitted on; ValueError (one line)
  where it held none back. `splits`: the run's `glue.run_splits`, where the caller has them."""
  calibration = (splits or glue.run_splits(config))[2]
  if calibration is None:
    raise ValueError(f"{workdir}: the run holds no calibration split to fit a budget on "
                     "(config.routing.calibration_examples=0)")
  return calibration


def leave_costs(stages: Sequence[dispatch.Stage], stage_flops: np.ndarray) -> np.ndarray:
  """What leaving at each stage costs [S, ...]: that stage and every stage it reads, from each
  stage's cost alone `stage_flops` [S, ...]."""
  stage_flops = np.asarray(stage_flops, np.float64)
  total = np.zeros_like(stage_flops)
  for s, stage in enumerate(stages):
    total[s] = stage_flops[s] + (total[stage.reads] if stage.reads != dispatch.TOKENS else 0.0)
  return total


class ExitEngine:
  """An early-exit model's inference on precompiled stage programs."""

  def __init__(self, model: EarlyExitModel, params: Any, *, length_buckets: Sequence[int],
               exit_layers: Sequence[int] | None = None,
               batch_buckets: Sequence[int] = dispatch.BATCH_BUCKETS, tokenizer: Any = None,
               task: glue.Task | None = None, cache_dir: str | None = None,
               rule: ExitCascade | None = None, runtime: str = "xla", precision: str = "fp32",
               threads: int = 0):
    """`runtime` "xla" runs float32 (bf16 is the SHARCS engine's only, so far); "onnxruntime"
    runs "fp32" or "int8" ("auto": int8 where the CPU has an int8 dot product) with `threads`
    intra-op threads. FLOPs are the float32 XLA stages' whatever runs them."""
    if runtime == "xla" and precision not in ("fp32", "auto"):
      raise ValueError(f"precision {precision!r}: an early-exit model runs fp32 on XLA (or fp32 "
                       "and int8 on ONNX Runtime)")
    self.runtime = runtime
    self.precision = "fp32" if runtime == "xla" else resolve_precision(
        precision, jax.default_backend(), runtime=runtime)
    self.model = model
    self.variables = {"params": params}
    self.length_buckets = tuple(length_buckets)
    self.batch_sizes = dispatch.batch_sizes_for(runtime, batch_buckets)
    self.program_lengths = dispatch.lengths_for(runtime, length_buckets)
    self.tokenizer, self.task = tokenizer, task
    self.spans = layer_spans(model.encoder.num_layers, exit_layers)
    stage_programs, self.stages, self.narrow_first, self.narrow_count = stage_layout(
        model, self.spans)
    narrow = self.narrow_count > 0
    self.exit_layers = tuple(p.span[1] + 1 for p in stage_programs)  # each stage's, 1-based
    self.stage_widths = tuple(p.width or 1.0 for p in stage_programs)
    self.programs = Programs(model, params,
                             batch_buckets=batch_buckets if runtime == "xla" else batch_buckets[:1],
                             length_buckets=length_buckets,
                             kinds=("stage", "narrow") if narrow else ("stage",),
                             spans=self.spans, cache_dir=cache_dir)
    if runtime == "xla":
      self.runner: Any = StageProgramRunner(self.programs, self.variables, stage_programs)
    else:
      from sharcs_jax.serve.onnx_programs import OnnxPrograms  # the serve extra, only here

      self.onnx = OnnxPrograms(model, params, precision=self.precision, cache_dir=cache_dir,
                               stages=stage_programs)
      self.runner = self.onnx.runner(threads)
    self.stage_flops = self.programs.stage_flops_table(stage_programs)  # [S, length buckets]
    self.rule = rule or self.layout_rule(NEVER_SURE)  # the full depth, narrow stages skipped
    self.workdir = self.backbone = None  # the training run's, when built from one (`from_kept`)
    self._check_rule(self.rule)

  def _check_rule(self, rule: ExitCascade) -> None:
    """ValueError unless `rule` is laid over this engine's stages (`layout_rule`)."""
    if rule.num_stages != len(self.stages):
      raise ValueError(f"the rule has {rule.num_stages} stages, the engine {len(self.stages)}")
    if rule.narrow_count != self.narrow_count or (
        self.narrow_count and rule.narrow_first != self.narrow_first):
      raise ValueError(f"the rule has {rule.narrow_count} narrow stages from stage "
                       f"{rule.narrow_first}, the engine {self.narrow_count} from "
                       f"{self.narrow_first}")

  def route_names(self) -> list[str]:
    """Each stage's exit by name (`route_name`)."""
    return [route_name(layer, w) for layer, w in zip(self.exit_layers, self.stage_widths)]

  def layout_rule(self, threshold: float, narrow_threshold: float | None = None,
                  signal: str = "entropy") -> ExitCascade:
    """An `ExitCascade` over this engine's stages (its narrow ones where it has them; None
    skips them) at these thresholds."""
    narrow = ((self.narrow_first, self.narrow_count, narrow_threshold) if self.narrow_count
              else (0, 0, None))
    return ExitCascade(threshold, len(self.stages), signal, "", 1.0, (), *narrow)

  def with_rule(self, rule: ExitCascade) -> "ExitEngine":
    """This engine under another rule, sharing its compiled programs (a budget sweep loads
    them once, not once per budget)."""
    self._check_rule(rule)
    routed = copy.copy(self)
    routed.rule = rule
    return routed

  def every_stage_rule(self) -> ExitCascade:
    """A rule under which every row runs every stage, narrow ones included."""
    return self.layout_rule(NEVER_SURE, NEVER_SURE)

  @classmethod
  def from_workdir(cls, workdir: str, **options: Any) -> "ExitEngine":
    """The kept epoch of an early-exit run (`baselines.train_early_exit`): `from_kept`."""
    from sharcs_jax.checkpoint import load_kept_exit  # orbax only where checkpoints are read

    return cls.from_kept(workdir, *load_kept_exit(workdir), **options)

  @classmethod
  def from_kept(cls, workdir: str, config: Any, model: EarlyExitModel, params: Any, *,
                budget: str = "", signal: str = "entropy", by_length: bool = False,
                rule: ExitCascade | None = None,
                exit_layers: Sequence[int] | None = None,
                batch_buckets: Sequence[int] = dispatch.BATCH_BUCKETS,
                cache_dir: str | None = None, runtime: str = "xla", precision: str = "fp32",
                threads: int = 0) -> "ExitEngine":
    """An early-exit run's model (`checkpoint.load_kept_exit`); with `budget` the exit
    threshold is calibrated on the run's calibration split (per length bucket with `by_length`,
    `calibrate`), else `rule` (default: every row runs every layer). Programs are stored under
    `workdir/executables`."""
    engine = cls(model, params, length_buckets=tuple(config.data.length_buckets),
                 exit_layers=exit_layers, batch_buckets=batch_buckets,
                 tokenizer=batching.load_tokenizer(resolve_model_dir(config.model.backbone)),
                 task=glue.get_task(config.task), rule=rule,
                 cache_dir=cache_dir or os.path.join(workdir, "executables"), runtime=runtime,
                 precision=precision, threads=threads)
    engine.workdir, engine.backbone = workdir, config.model.backbone
    if budget:
      (data,) = batching.encode_splits([calibration_split(config, workdir)], engine.tokenizer,
                                       engine.length_buckets)
      engine.rule = engine.calibrate(budget, data, signal, by_length)
      logging.info("Exits calibrated to budget %s: %s on %d calibration examples", budget,
                   engine.rule.to_json(), len(data))
    return engine

  def every_stage(self, data: batching.Encoded) -> np.ndarray:
    """Each stage's class probabilities [S, N, C] for every row (every row runs every stage)."""
    out, _ = self._dispatch(data, self.every_stage_rule())
    return np.stack([outputs[0] for outputs in out.outputs])

  def calibrate(self, budget: Budget | str, data: batching.Encoded, signal: str = "entropy",
                by_length: bool = False, every_stage: np.ndarray | None = None,
                narrow: bool = True) -> ExitCascade:
    """The exit threshold that meets `budget` on `data` (inputs the model did not train on),
    with `by_length` one per length bucket (`routing.calibrate_exits`); for a depth-and-width
    model both thresholds, searched jointly on `data`'s labels (`calibrate_depth_width`), or
    with `narrow` False its full-width exits alone; not applied. `every_stage`: `data`'s
    probabilities at every stage, where the caller has them."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    every_stage = self.every_stage(data) if every_stage is None else every_stage
    stage_flops = self.stage_flops[:, data.bucket_of].T
    if self.narrow_count and narrow:
      if by_length:
        raise ValueError("a depth-and-width model's thresholds are fitted over all lengths")
      return calibrate_depth_width(every_stage, stage_flops, data.labels, budget,
                                   self.narrow_first, self.narrow_count, signal=signal)[0]
    return calibrate_exits(every_stage, stage_flops, budget, signal,
                           bucket_of=data.bucket_of if by_length else None,
                           num_buckets=len(self.length_buckets),
                           layout=self.layout_rule(0.0, signal=signal))

  def encode(self, texts: Sequence[Text], labels: Sequence[int] | None = None
             ) -> batching.Encoded:
    return encode_texts_for(self.task, self.tokenizer, self.length_buckets, texts, labels)

  def predict(self, texts: Sequence[Text]) -> ExitPredictions:
    return self.run(self.encode(texts))

  def run(self, data: batching.Encoded) -> ExitPredictions:
    """Predictions for every row of `data`, in row order."""
    out, flops = self._dispatch(data, self.rule)
    return ExitPredictions(out.probabilities.argmax(-1).astype(np.int32), out.probabilities,
                           np.asarray(self.exit_layers, np.int32)[out.final], flops / 1e9,
                           np.asarray(self.stage_widths, np.float32)[out.final])

  def full_depth_gflops(self, data: batching.Encoded) -> np.ndarray:
    """Per-example GFLOPs [N] had every row run every full-width stage: the reduction's
    baseline."""
    full = self.stage_flops[np.asarray(self.stage_widths) == 1.0]
    return full.sum(0)[data.bucket_of] / 1e9

  def _dispatch(self, data: batching.Encoded, rule: ExitCascade
                ) -> tuple[dispatch.StagesRun, np.ndarray]:
    if data.length_buckets != self.length_buckets:
      raise ValueError(f"inputs were bucketed to {data.length_buckets}, the engine was compiled "
                       f"for {self.length_buckets}")
    return dispatch.run_stage_buckets(
        self.runner, self.stages, data.input_ids, data.token_type_ids, data.lengths,
        length_buckets=self.length_buckets, batch_buckets=self.batch_sizes,
        num_classes=self.model.num_classes, rule=rule.over_rows(data.bucket_of),
        stage_flops=self.stage_flops,
        program_lengths=self.program_lengths)
