"""A model's stage layout, and rows run through it: what every engine and loader serves with.

SHARCS, the early exit and depth-and-width are layouts of stages over the one dispatch core
(`dispatch.run_stages`): SHARCS is the prefix (layers 1..K and the router, no answer) and each
width's part reading it; an early-exit model is layers 1..k, k+1..l, ... each answering, with
a depth-and-width model's narrow stages after layer K. A `Layout` says which stage reads which,
the width and layer each stage answers at, and one FLOPs table, per stage and length bucket, from
the compiled programs' cost analysis: the one place a row's route and cost are read from. `run`
serves rows through a layout under a rule and gives `Predictions`, the one result type.

Imports only numpy and the numpy-only dispatch and routing modules, so that the exported loader,
which has no flax, uses it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from sharcs_jax.data.padding import length_bucket_of
from sharcs_jax.serve import dispatch
from sharcs_jax.serve.routing import WidthStages


def width_label(width: float) -> str:
  """A width as names and metrics spell it ("0.25", "1"): `model.widths.width_label`'s rule,
  here without the flax model package."""
  return f"{float(width):g}"


def route_name(exit_layer: int, width: float = 1.0) -> str:
  """An early-exit model's exit by name: "layer 3", or "layer 6 at width 0.5" for a
  depth-and-width model's narrow stage."""
  return f"layer {int(exit_layer)}" + ("" if width == 1.0 else f" at width {float(width):g}")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The stages of one model and what each answers as.

  `widths` is set for a SHARCS model (stage 0 its prefix, stage 1 + i width i's part, in the
  router's order): its rows are routed by width. Otherwise rows are routed by depth, each stage
  an exit after `stage_layers[s]` at `stage_widths[s]`, narrow stages `narrow_first` onwards.
  """

  stages: tuple[dispatch.Stage, ...]
  stage_widths: tuple[float, ...]  # the width of each stage's layers
  stage_layers: tuple[int, ...]  # the layer (1-based) each stage's output follows
  stage_flops: np.ndarray  # float64 [S, length buckets]: one example's FLOPs of each stage alone
  widths: tuple[float, ...] = ()
  narrow_first: int = 0
  narrow_count: int = 0

  @property
  def by_width(self) -> bool:
    """Rows are routed by width (SHARCS), not by depth."""
    return bool(self.widths)

  def route_names(self) -> list[str]:
    """Each answering stage's route by name, as predictions and metrics give it: a SHARCS
    width's label, or an exit's `route_name`."""
    if self.by_width:
      return [width_label(w) for w in self.widths]
    return [route_name(layer, w) for layer, w in zip(self.stage_layers, self.stage_widths)]

  def full_flops(self) -> np.ndarray:
    """One example's FLOPs [length buckets] at full width and depth: the reduction's baseline
    (SHARCS: prefix and the full width's part; exits: every full-width stage)."""
    if self.by_width:
      return self.stage_flops[0] + self.stage_flops[-1]
    full = np.asarray(self.stage_widths) == 1.0
    return self.stage_flops[full].sum(0)

  def width_flops(self) -> np.ndarray:
    """A SHARCS model's FLOPs per example [m, length buckets] at each width, prefix included:
    what cost-aware rules weigh."""
    return self.stage_flops[0] + self.stage_flops[1:]

  def exit_order(self) -> np.ndarray:
    """Stage indices with the full-width stages first (in layer order), then the narrow ones:
    the order an early-exit report lists its exits in."""
    stages = np.arange(len(self.stages))
    narrow = (stages >= self.narrow_first) & (stages < self.narrow_first + self.narrow_count)
    return np.concatenate([stages[~narrow], stages[narrow]])

  def stage_rule(self, rule: Any, bucket_of: np.ndarray) -> dispatch.StageRule:
    """`rule` over these stages for rows of these length buckets: a SHARCS rule picks each
    row's first width from the router and may escalate; an exit rule sends a row on until it
    is sure."""
    if self.by_width:
      return WidthStages(rule, len(self.widths), self.width_flops()[:, bucket_of].T)
    return rule.over_rows(bucket_of)

  def stage_runner(self, runner: Any) -> dispatch.StageRunner:
    """`runner` as the dispatch core calls it: a SHARCS runner's prefix and parts as stages."""
    return dispatch.WidthParts(runner) if self.by_width else runner


def width_layout(widths: Sequence[float], router_layer: int, num_layers: int,
                 prefix_flops: np.ndarray, part_flops: np.ndarray) -> Layout:
  """A SHARCS model's layout: the prefix (layers 1..K and the router; `prefix_flops` [length
  buckets]), then each width's part reading it (`part_flops` [m, length buckets])."""
  m = len(widths)
  stages = (dispatch.Stage(dispatch.TOKENS, answers=False),) + (dispatch.Stage(0, True),) * m
  flops = np.vstack([np.asarray(prefix_flops, np.float64)[None],
                     np.asarray(part_flops, np.float64)])
  return Layout(stages, (1.0, *map(float, widths)), (router_layer,) + (num_layers,) * m, flops,
                widths=tuple(map(float, widths)))


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Every engine's and loader's answer, rows in input order."""

  labels: np.ndarray  # int32 [N]
  probabilities: np.ndarray  # float32 [N, C] where each row's route ended
  widths: np.ndarray  # float32 [N] the width of the layers that answered
  exit_layers: np.ndarray  # int32 [N] the layer they answered after (1-based)
  gflops: np.ndarray  # float64 [N] what each row ran
  routes: tuple[str, ...]  # [N] each row's route by name (`Layout.route_names`)
  by_width: bool = True  # routed by width (SHARCS) or by depth (exits)

  def share_per_route(self, names: Sequence[str]) -> dict[str, float]:
    """The share of rows that took each of these routes (0 where none did)."""
    n = len(self.routes)
    return {name: self.routes.count(name) / n if n else 0.0 for name in names}

  def share_per_width(self, widths: Sequence[float]) -> dict[str, float]:
    """The share of rows that ended at each of `widths`, keyed by width label."""
    return {width_label(w): float(np.mean(self.widths == w)) if len(self.widths) else 0.0
            for w in widths}

  def route_detail(self, row: int) -> dict[str, float | int]:
    """A row's route in an answer: its width, or the layer it exited after (and the width of a
    narrow exit)."""
    if self.by_width:
      return {"width": float(self.widths[row])}
    route = {"exit_layer": int(self.exit_layers[row])}
    width = float(self.widths[row])
    return route if width == 1.0 else {**route, "width": width}

  def metric_routes(self) -> list[str]:
    """Each row's route as a metric label value: "0.25" for a width, "3" or "6 at width 0.5"
    for an exit."""
    return [r.removeprefix("layer ") for r in self.routes]


def run(layout: Layout, runner: Any, rule: Any, ids: np.ndarray, types: np.ndarray,
        lengths: np.ndarray, *, length_buckets: Sequence[int], batch_sizes: Sequence[int],
        program_lengths: Sequence[int], num_classes: int, block_size: int | None = None,
        to_host: Any = np.asarray) -> tuple[Predictions, dispatch.StagesRun]:
  """Rows (`ids`, `types` [N, >= the longest program length], `lengths` [N] real tokens)
  through `layout` under `rule`, in ascending length and back in row order: the predictions,
  and the dispatch core's own record (every stage's outputs, which stages each row ran)."""
  bucket_of = length_bucket_of(np.asarray(lengths), length_buckets)
  out, flops = dispatch.run_stage_buckets(
      layout.stage_runner(runner), layout.stages, ids, types, lengths,
      length_buckets=length_buckets, batch_buckets=batch_sizes, num_classes=num_classes,
      rule=layout.stage_rule(rule, bucket_of), stage_flops=layout.stage_flops,
      program_lengths=program_lengths, block_size=block_size, to_host=to_host)
  names = layout.route_names()
  answer = out.final - 1 if layout.by_width else out.final  # SHARCS: the prefix never answers
  predictions = Predictions(
      labels=out.probabilities.argmax(-1).astype(np.int32), probabilities=out.probabilities,
      widths=np.asarray(layout.stage_widths, np.float32)[out.final],
      exit_layers=np.asarray(layout.stage_layers, np.int32)[out.final], gflops=flops / 1e9,
      routes=tuple(names[a] for a in answer), by_width=layout.by_width)
  return predictions, out
