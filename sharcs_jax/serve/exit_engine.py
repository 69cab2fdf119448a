"""Serving an early-exit model (DeeBERT / PABEE's network) through the one dispatch core.

The model's layers are cut into stages (by default one per layer, as DeeBERT checks every exit):
stage j runs its layers on the hidden states stage j - 1 returned and gives its exit's class
probabilities, and `routing.ExitCascade` lets a row leave at the first stage it is sure at. Each
stage is its own precompiled program per (batch, length) bucket (`programs.Programs`, kind
"stage"), so a row that leaves after layer 2 really runs two layers; FLOPs are the stages' XLA
cost analysis, summed over the stages a row ran. A budget ("2x") is met by calibrating the exit
threshold on the run's calibration split (held-out training examples).
"""

from __future__ import annotations

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
from sharcs_jax.serve.engine import Text, encode_texts_for
from sharcs_jax.serve.exported import spans_of
from sharcs_jax.serve.precision import resolve as resolve_precision
from sharcs_jax.serve.programs import Programs, Span, StageProgramRunner
from sharcs_jax.serve.routing import Budget, ExitCascade, calibrate_exits, parse_budget

NEVER_SURE = 2.0  # a threshold no confidence reaches: every row runs every stage


@dataclasses.dataclass(frozen=True)
class ExitPredictions:
  labels: np.ndarray  # int32 [N]
  probabilities: np.ndarray  # float32 [N, C] at the exit each row left at
  exit_layers: np.ndarray  # int32 [N] that exit's layer, 1-based
  gflops: np.ndarray  # float64 [N] the stages each row ran


def layer_spans(num_layers: int, exit_layers: Sequence[int] | None = None) -> tuple[Span, ...]:
  """Stages ending at each of `exit_layers` (1-based; default every layer; the last is always
  an exit)."""
  ends = sorted(set(exit_layers or range(1, num_layers + 1)) | {num_layers})
  if ends[0] < 1 or ends[-1] > num_layers:
    raise ValueError(f"exit layers {list(exit_layers)} must lie in 1..{num_layers}")
  return spans_of(ends)


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
    self.exit_layers = tuple(last + 1 for _, last in self.spans)
    self.programs = Programs(model, params,
                             batch_buckets=batch_buckets if runtime == "xla" else batch_buckets[:1],
                             length_buckets=length_buckets, kinds=("stage",), spans=self.spans,
                             cache_dir=cache_dir)
    if runtime == "xla":
      self.runner: Any = StageProgramRunner(self.programs, self.variables)
    else:
      from sharcs_jax.serve.onnx_programs import OnnxPrograms  # the serve extra, only here

      self.onnx = OnnxPrograms(model, params, precision=self.precision, cache_dir=cache_dir,
                               spans=self.spans)
      self.runner = self.onnx.runner(threads)
    self.stages = dispatch.chained_stages(len(self.spans))
    self.stage_flops = self.programs.stage_flops_table()  # [S, length buckets]
    self.rule = rule or ExitCascade(NEVER_SURE, len(self.spans))
    self.workdir = self.backbone = None  # the training run's, when built from one (`from_kept`)
    if self.rule.num_stages != len(self.spans):
      raise ValueError(f"the rule has {self.rule.num_stages} stages, the engine {len(self.spans)}")

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
      calibration = glue.run_splits(config)[2]
      if calibration is None:
        raise ValueError(f"{workdir}: the run holds no calibration split to fit budget {budget} "
                         "on (config.routing.calibration_examples=0)")
      (data,) = batching.encode_splits([calibration], engine.tokenizer, engine.length_buckets)
      engine.rule = engine.calibrate(budget, data, signal, by_length)
      logging.info("Exits calibrated to budget %s: %s on %d calibration examples", budget,
                   engine.rule.to_json(), len(data))
    return engine

  def every_stage(self, data: batching.Encoded) -> np.ndarray:
    """Each stage's class probabilities [S, N, C] for every row (every row runs every stage)."""
    out, _ = self._dispatch(data, ExitCascade(NEVER_SURE, len(self.spans)))
    return np.stack([outputs[0] for outputs in out.outputs])

  def calibrate(self, budget: Budget | str, data: batching.Encoded, signal: str = "entropy",
                by_length: bool = False, every_stage: np.ndarray | None = None) -> ExitCascade:
    """The exit threshold that meets `budget` on `data` (inputs the model did not train on),
    with `by_length` one per length bucket (`routing.calibrate_exits`); not applied.
    `every_stage`: `data`'s probabilities at every stage, where the caller has them."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    every_stage = self.every_stage(data) if every_stage is None else every_stage
    return calibrate_exits(every_stage, self.stage_flops[:, data.bucket_of].T, budget, signal,
                           bucket_of=data.bucket_of if by_length else None,
                           num_buckets=len(self.length_buckets))

  def encode(self, texts: Sequence[Text], labels: Sequence[int] | None = None
             ) -> batching.Encoded:
    return encode_texts_for(self.task, self.tokenizer, self.length_buckets, texts, labels)

  def predict(self, texts: Sequence[Text]) -> ExitPredictions:
    return self.run(self.encode(texts))

  def run(self, data: batching.Encoded) -> ExitPredictions:
    """Predictions for every row of `data`, in row order."""
    out, flops = self._dispatch(data, self.rule)
    return ExitPredictions(out.probabilities.argmax(-1).astype(np.int32), out.probabilities,
                           np.asarray(self.exit_layers, np.int32)[out.final], flops / 1e9)

  def full_depth_gflops(self, data: batching.Encoded) -> np.ndarray:
    """Per-example GFLOPs [N] had every row run every stage: the reduction's baseline."""
    return self.stage_flops.sum(0)[data.bucket_of] / 1e9

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
