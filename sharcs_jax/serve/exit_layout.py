"""An early-exit model's stage layout (DeeBERT / PABEE's network), as the engine serves it.

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

from typing import Any, Sequence

import numpy as np

from sharcs_jax.data import glue
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.serve import dispatch
from sharcs_jax.serve.export.loader import spans_of
from sharcs_jax.serve.programs import Span, StageProgram

NEVER_SURE = 2.0  # a threshold no confidence reaches: every row runs every stage


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
