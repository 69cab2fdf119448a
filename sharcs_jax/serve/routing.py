"""Routing rules over the trained router: the paper's argmax, and argmax under a FLOPs budget.

The router is trained on confidences of *training* examples, which the model has largely
memorised; on unseen inputs it is less sure that an input is easy, so its argmax saves fewer
FLOPs than its training labels promise. The budget rule fixes the trade-off after training:
each example takes argmax_i(router_logit_i - lam * cost_i), with cost_i the FLOPs of width i
relative to full width at the example's length. lam = 0 is the paper's argmax; a larger lam
buys fewer FLOPs for every example at once, so the average cost never rises with lam, and one
scalar calibrated on held-out data meets a reduction target (`calibrate`).

The cascade (`Cascade`) needs no router: every input runs the narrowest width first (or the width
the budget rule picks, for the combination), and an input whose prediction there is less
confident than a threshold escalates to the next width, reusing the prefix's hidden states. It
costs the prefix plus every part it ran. One threshold, calibrated like the cost weight, meets a
budget (`calibrate_cascade`). Rules share two methods that the dispatch core calls:
`first_widths` (from the router) and `escalates` (from a width's probabilities).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

from sharcs_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Budget:
  """A target, as a FLOPs-reduction factor ("2.5x") or as average GFLOPs per example ("0.4")."""

  reduction: float | None = None
  gflops: float | None = None

  def target_gflops(self, full_width_gflops: float) -> float:
    return full_width_gflops / self.reduction if self.reduction else self.gflops

  def __str__(self) -> str:
    return f"{self.reduction:g}x" if self.reduction else f"{self.gflops:g} GFLOPs"


def parse_budget(spec: str) -> Budget:
  """'2x', '2.5x' -> a reduction factor; '0.4', '0.4gflops' -> average GFLOPs per example."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|gflops)?\s*", spec.lower())
  if not match:
    raise ConfigError(f"budget {spec!r}: expected a reduction factor such as '2x' or average "
                      "GFLOPs per example such as '0.4gflops'")
  value = float(match.group(1))
  if value <= 0:
    raise ConfigError(f"budget {spec!r} must be positive")
  return Budget(reduction=value) if match.group(2) == "x" else Budget(gflops=value)


@dataclasses.dataclass(frozen=True)
class Rule:
  """argmax(router_logits - cost_weight * relative cost); cost_weight 0 is the paper's argmax."""

  cost_weight: float = 0.0
  budget: str = ""  # the target it was calibrated for, "" for the paper's rule
  calibration_reduction: float = 1.0  # reduction reached on the calibration split

  name = "router"
  escalating = False

  def choose(self, router_logits: np.ndarray, example_flops: np.ndarray) -> np.ndarray:
    """Width index per example. router_logits [N, m]; example_flops [N, m], last = full width."""
    return choose_widths(router_logits, example_flops, self.cost_weight)

  first_widths = choose

  def escalates(self, probabilities: np.ndarray, width_index: int) -> np.ndarray:
    return np.zeros(len(probabilities), bool)

  def to_json(self) -> dict:
    return {"rule": self.name, "budget": self.budget, "cost_weight": self.cost_weight,
            "calibration_reduction": self.calibration_reduction}


CONFIDENCE_SIGNALS = ("max_prob", "margin", "entropy")
RULES = ("router", "cascade", "router+cascade")


def confidence(probabilities: np.ndarray, signal: str = "max_prob") -> np.ndarray:
  """How sure a prediction is, in [0, 1]: top probability, top-two margin, or 1 - H / log C."""
  p = np.asarray(probabilities, np.float64)
  if signal == "max_prob":
    return p.max(-1)
  if signal == "margin":
    top = np.sort(p, axis=-1)
    return top[..., -1] - top[..., -2]
  if signal == "entropy":
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    # clipped: float32 probabilities near uniform can give H a hair above log C
    return np.clip(1.0 - entropy / np.log(p.shape[-1]), 0.0, 1.0)
  raise ValueError(f"unknown confidence signal {signal!r}; known: {CONFIDENCE_SIGNALS}")


@dataclasses.dataclass(frozen=True)
class Cascade:
  """Start narrow; escalate to the next width while confidence < `threshold`.

  `start_cost_weight` None starts every input at the narrowest width; a number starts it where the
  budget rule with that cost weight routes it (the router may send hard inputs straight to full
  width), and the cascade escalates from there.
  """

  threshold: float
  signal: str = "max_prob"
  budget: str = ""
  calibration_reduction: float = 1.0
  start_cost_weight: float | None = None

  name = "cascade"
  escalating = True

  def first_widths(self, router_logits: np.ndarray, example_flops: np.ndarray) -> np.ndarray:
    if self.start_cost_weight is None:
      return np.zeros(len(router_logits), np.int64)
    return choose_widths(router_logits, example_flops, self.start_cost_weight)

  def escalates(self, probabilities: np.ndarray, width_index: int) -> np.ndarray:
    return confidence(probabilities, self.signal) < self.threshold

  def to_json(self) -> dict:
    return {"rule": self.name, "budget": self.budget, "threshold": self.threshold,
            "signal": self.signal, "start_cost_weight": self.start_cost_weight,
            "calibration_reduction": self.calibration_reduction}


@dataclasses.dataclass(frozen=True)
class Fixed:
  """Every input at one width, the router unread: the static baseline served by the engine."""

  width_index: int
  budget: str = ""
  calibration_reduction: float = 1.0

  name = "fixed"
  escalating = False

  def first_widths(self, router_logits: np.ndarray, example_flops: np.ndarray) -> np.ndarray:
    return np.full(len(router_logits), self.width_index, np.int64)

  def escalates(self, probabilities: np.ndarray, width_index: int) -> np.ndarray:
    return np.zeros(len(probabilities), bool)

  def to_json(self) -> dict:
    return {"rule": self.name, "budget": self.budget, "width_index": self.width_index,
            "calibration_reduction": self.calibration_reduction}


def rule_from_json(saved: dict) -> "Rule | Cascade | Fixed | ExitCascade":
  """The inverse of `to_json`; {} (or no budget) is the router's argmax."""
  if not saved:
    return Rule()
  if saved.get("rule") == "exit":
    narrow = saved.get("narrow_threshold")
    return ExitCascade(float(saved["threshold"]), int(saved["num_stages"]), saved["signal"],
                       saved["budget"], float(saved["calibration_reduction"]),
                       tuple(float(t) for t in saved.get("bucket_thresholds", ())),
                       int(saved.get("narrow_first", 0)), int(saved.get("narrow_count", 0)),
                       None if narrow is None else float(narrow))
  if saved.get("rule") == "fixed":
    return Fixed(int(saved["width_index"]), saved["budget"], float(saved["calibration_reduction"]))
  if saved.get("rule") == "cascade":
    start = saved.get("start_cost_weight")
    return Cascade(float(saved["threshold"]), saved.get("signal", "max_prob"), saved["budget"],
                   float(saved["calibration_reduction"]),
                   None if start is None else float(start))
  return Rule(float(saved["cost_weight"]), saved["budget"], float(saved["calibration_reduction"]))


STOP = -1  # a stage rule's answer for a row that stops where it is (`dispatch.run_stages`)


def replay(rule: Any, stage_outputs: Sequence[tuple[np.ndarray, ...]]
           ) -> tuple[np.ndarray, np.ndarray]:
  """(the stage each row stops at [N], the stages it ran [N, S]) of the cascade
  `dispatch.run_stages` runs, walked on every stage's outputs already known (per stage, a tuple
  of arrays [N, ...]); `rule` (a `dispatch.StageRule`) is asked about rows by their numbers. The
  one offline replay: of SHARCS's widths (`route_all`) and of an early exit (`ExitCascade`)."""
  n = len(stage_outputs[0][0])
  at = np.zeros(n, np.int64)  # the stage each row runs next, or STOP
  final = np.full(n, STOP, np.int64)
  ran = np.zeros((n, len(stage_outputs)), bool)
  for stage, outputs in enumerate(stage_outputs):
    rows = np.flatnonzero(at == stage)
    ran[rows, stage] = True
    go_to = np.asarray(rule.next_stages(stage, rows, tuple(o[rows] for o in outputs)), np.int64)
    final[rows[go_to == STOP]] = stage
    at[rows] = go_to
  return final, ran


def ran_flops(ran: np.ndarray, stage_flops: np.ndarray) -> np.ndarray:
  """FLOPs per row [N]: the sum of the stages it ran (`ran` [N, S]), each at the row's cost
  (`stage_flops` [N, S], or [S] for rows of one length). What the served engines count, so the
  one convention every replay, calibration and report is costed by."""
  return (np.asarray(ran) * np.asarray(stage_flops, np.float64)).sum(-1)


@dataclasses.dataclass(frozen=True)
class WidthStages:
  """A SHARCS routing rule as a stage rule (`dispatch.StageRule`): the router's first width, then
  escalation. Stage 0 is the prefix (its output the router's logits), stage 1 + i width i's
  part."""

  rule: "Rule | Cascade | Fixed"
  num_widths: int
  width_flops: np.ndarray  # float64 [n, m]

  def continues(self, stage: int) -> bool:
    return stage == 0 or (self.rule.escalating and stage < self.num_widths)

  def next_stages(self, stage: int, rows: np.ndarray, outputs: tuple[np.ndarray, ...]
                  ) -> np.ndarray:
    if stage == 0:
      return 1 + np.asarray(self.rule.first_widths(outputs[0], self.width_flops[rows]), np.int64)
    if not self.continues(stage):
      return np.full(len(rows), STOP, np.int64)
    return np.where(self.rule.escalates(outputs[0], stage - 1), stage + 1, STOP)


def route_all(rule: "Rule | Cascade | Fixed", probabilities: np.ndarray,
              router_logits: np.ndarray, example_flops: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """(final width index [N], widths run [N, m]) of `rule` given every width's probabilities
  [m, N, C]: what serving computes, without running anything (`replay` of the prefix, then
  each width's part). An input ends at the first width it does not escalate from."""
  m, n = probabilities.shape[:2]
  flops = np.broadcast_to(np.asarray(example_flops, np.float64), (n, m))
  final, ran = replay(WidthStages(rule, m, flops),
                      [(np.asarray(router_logits),)] + [(p,) for p in probabilities])
  return final - 1, ran[:, 1:]


def width_ran_flops(ran: np.ndarray, example_flops: np.ndarray,
                    prefix_flops: np.ndarray | float) -> np.ndarray:
  """`ran_flops` of SHARCS's cascade (`ran` [N, m]: the widths each row ran): the prefix once,
  then each width's part, its example FLOPs (`example_flops` [N, m] or [m], prefix included)
  less the prefix's (`prefix_flops` [N] or a scalar)."""
  n, m = np.shape(ran)
  example = np.broadcast_to(np.asarray(example_flops, np.float64), (n, m))
  prefix = np.broadcast_to(np.asarray(prefix_flops, np.float64).reshape(-1, 1), (n, 1))
  return ran_flops(np.column_stack([np.ones(n, bool), ran]),
                   np.column_stack([prefix, example - prefix]))


@dataclasses.dataclass(frozen=True)
class ExitCascade:
  """DeeBERT's rule over an early-exit model's stages: a row leaves at the first stage whose
  confidence reaches `threshold` (with "entropy", 1 - H / log C: DeeBERT's entropy threshold);
  the last stage answers the rest. With `bucket_thresholds` (one per length bucket) a row's own
  length bucket decides its threshold: the rule then runs `over_rows` of known buckets.

  A depth-and-width model's cascade has `narrow_count` narrow stages from `narrow_first` (each
  reading the full-width stage before them): a row not sure at that stage tries them in turn and
  leaves at the first whose confidence reaches `narrow_threshold`; the unsure go on at full width
  (stage `narrow_first + narrow_count`). With `narrow_threshold` None the narrow stages are
  skipped: the plain early exit over the model's full-width stages."""

  threshold: float
  num_stages: int
  signal: str = "entropy"
  budget: str = ""
  calibration_reduction: float = 1.0
  bucket_thresholds: tuple[float, ...] = ()
  narrow_first: int = 0
  narrow_count: int = 0
  narrow_threshold: float | None = None

  name = "exit"

  def continues(self, stage: int) -> bool:
    return stage < self.num_stages - 1

  def next_stages(self, stage: int, rows: np.ndarray, outputs: tuple[np.ndarray, ...]
                  ) -> np.ndarray:
    if self.bucket_thresholds:
      raise ValueError("thresholds per length bucket need the rows' buckets: run over_rows")
    return self.next_stages_at(stage, outputs, self.threshold)

  def is_narrow(self, stage: int) -> bool:
    return self.narrow_first <= stage < self.narrow_first + self.narrow_count

  def next_stages_at(self, stage: int, outputs: tuple[np.ndarray, ...],
                     threshold: float | np.ndarray) -> np.ndarray:
    """`next_stages` with this `threshold` (or one per row)."""
    sure = confidence(outputs[0], self.signal)
    if self.is_narrow(stage):
      leaves = sure >= self.narrow_threshold
    else:
      leaves = (sure >= threshold) | (not self.continues(stage))
    after = stage + 1
    if self.narrow_count and stage == self.narrow_first - 1 and self.narrow_threshold is None:
      after = self.narrow_first + self.narrow_count  # past the skipped narrow stages
    return np.where(leaves, STOP, after).astype(np.int64)

  def row_thresholds(self, bucket_of: np.ndarray) -> np.ndarray:
    """Each row's threshold [N] from its length bucket index."""
    if bucket_of is None:
      raise ValueError("thresholds per length bucket need the rows' length buckets")
    if not self.bucket_thresholds:
      return np.full(len(bucket_of), self.threshold)
    return np.asarray(self.bucket_thresholds, np.float64)[np.asarray(bucket_of)]

  def over_rows(self, bucket_of: np.ndarray) -> "_RowThresholds":
    """The rule as `dispatch.run_stage_buckets` asks it about rows of these length buckets."""
    return _RowThresholds(self, self.row_thresholds(bucket_of))

  def paths(self, stage_probabilities: np.ndarray, bucket_of: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(the stage each row leaves at [N], the stages it ran [N, S]) from every stage's
    probabilities [S, N, C] (and the rows' length buckets, with thresholds per bucket): the
    cascade `dispatch.run_stages` runs, `replay`ed on outputs already known."""
    stage_probabilities = np.asarray(stage_probabilities)
    n = stage_probabilities.shape[1]
    threshold = (np.full(n, self.threshold) if bucket_of is None and not self.bucket_thresholds
                 else self.row_thresholds(bucket_of))
    return replay(_RowThresholds(self, threshold), [(p,) for p in stage_probabilities])

  def exits(self, stage_probabilities: np.ndarray, bucket_of: np.ndarray | None = None
            ) -> np.ndarray:
    """The stage each row leaves at [N] (`paths`)."""
    return self.paths(stage_probabilities, bucket_of)[0]

  def full_depth(self) -> np.ndarray:
    """bool [S]: the stages a row runs at full depth (every full-width stage)."""
    return ~np.array([self.is_narrow(s) for s in range(self.num_stages)], bool)

  def to_json(self) -> dict:
    saved = {"rule": self.name, "budget": self.budget, "threshold": self.threshold,
             "signal": self.signal, "num_stages": self.num_stages,
             "calibration_reduction": self.calibration_reduction,
             "bucket_thresholds": list(self.bucket_thresholds)}
    if self.narrow_count:
      saved.update(narrow_first=self.narrow_first, narrow_count=self.narrow_count,
                   narrow_threshold=self.narrow_threshold)
    return saved


@dataclasses.dataclass(frozen=True)
class _RowThresholds:
  """An `ExitCascade` with each row's own threshold (`dispatch.StageRule`, rows by number)."""

  rule: ExitCascade
  thresholds: np.ndarray  # [N]

  def continues(self, stage: int) -> bool:
    return self.rule.continues(stage)

  def next_stages(self, stage: int, rows: np.ndarray, outputs: tuple[np.ndarray, ...]
                  ) -> np.ndarray:
    return self.rule.next_stages_at(stage, outputs, self.thresholds[rows])


# A length bucket with fewer calibration rows than this shares a threshold with the other such.
MIN_BUCKET_ROWS = 100


def calibrate_exits(stage_probabilities: np.ndarray, stage_flops: np.ndarray, budget: Budget,
                    signal: str = "entropy", bucket_of: np.ndarray | None = None,
                    num_buckets: int = 0, iterations: int = 60,
                    layout: ExitCascade | None = None) -> ExitCascade:
  """The highest threshold (latest exits) whose average FLOPs on these examples meet the
  budget, against running every full-width stage. `stage_probabilities` [S, N, C];
  `stage_flops` [N, S] each stage's cost alone. Cost never falls as the threshold rises, so a
  bisection finds it. `layout`: a depth-and-width cascade's narrow stages and their threshold
  (kept; the depth threshold is fitted).

  With `bucket_of` [N] (each row's length bucket, of `num_buckets`) the budget is met within
  each bucket of at least `MIN_BUCKET_ROWS` rows by a threshold of its own, and within the rows
  of the smaller buckets together by one more (buckets without rows take the pooled threshold):
  a bucket that meets the target reduction keeps meeting it however the mix of lengths shifts."""
  stage_flops = np.asarray(stage_flops, np.float64)
  if len(stage_flops) == 0:
    raise ValueError("cannot calibrate a budget on zero examples")
  count = stage_flops.shape[1]
  layout = dataclasses.replace(layout or ExitCascade(0.0, count), num_stages=count,
                               signal=signal, budget=str(budget))
  pooled, reduction = _exit_threshold(stage_probabilities, stage_flops, budget, layout,
                                      iterations)
  if bucket_of is None:
    return dataclasses.replace(layout, threshold=pooled, calibration_reduction=reduction)
  bucket_of = np.asarray(bucket_of)
  rows_in = np.bincount(bucket_of, minlength=num_buckets)
  groups = [bucket_of == b for b in range(num_buckets) if rows_in[b] >= MIN_BUCKET_ROWS]
  small = np.isin(bucket_of, np.flatnonzero((rows_in > 0) & (rows_in < MIN_BUCKET_ROWS)))
  groups.append(small)
  thresholds = np.full(num_buckets, pooled)
  for rows in groups:
    if rows.sum() < MIN_BUCKET_ROWS:
      continue  # too few rows to fit: the pooled threshold
    try:
      threshold = _exit_threshold(stage_probabilities[:, rows], stage_flops[rows], budget,
                                  layout, iterations)[0]
    except ValueError:  # out of these rows' reach: they keep the pooled threshold
      continue
    thresholds[np.unique(bucket_of[rows])] = threshold
  rule = dataclasses.replace(layout, threshold=pooled,
                             bucket_thresholds=tuple(thresholds.tolist()))
  return dataclasses.replace(rule, calibration_reduction=exit_reduction(
      rule, stage_probabilities, stage_flops, bucket_of))


# Where a depth-and-width calibration tries the narrow stages' threshold: these quantiles of the
# first narrow stage's confidence on the calibration rows (and None: skip the narrow stages).
NARROW_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def calibrate_depth_width(stage_probabilities: np.ndarray, stage_flops: np.ndarray,
                          labels: np.ndarray, budget: Budget, narrow_first: int,
                          narrow_count: int, signal: str = "entropy",
                          narrow_thresholds: Sequence[float | None] | None = None,
                          ) -> tuple[ExitCascade, list[dict]]:
  """The depth-and-width cascade that meets `budget` most accurately on these labelled rows: for
  each narrow threshold (a small search, None skipping the narrow stages; by default None and
  the `NARROW_QUANTILES` of the narrow stages' confidences, whatever the signal's range) the
  depth threshold that meets the budget (`calibrate_exits`), then the pair with the best
  accuracy (ties: the earlier candidate). Returns it and every candidate's accuracy and
  reduction, for the report."""
  labels = np.asarray(labels)
  if narrow_thresholds is None:
    narrow = np.asarray(stage_probabilities[narrow_first:narrow_first + narrow_count])
    sure = confidence(narrow.reshape(-1, narrow.shape[-1]), signal)  # every narrow exit's
    narrow_thresholds = [None] + sorted(set(np.quantile(sure, NARROW_QUANTILES).tolist()))
  tried, best, best_accuracy = [], None, -1.0
  for narrow in narrow_thresholds:
    layout = ExitCascade(0.0, len(stage_probabilities), signal, narrow_first=narrow_first,
                         narrow_count=narrow_count, narrow_threshold=narrow)
    try:
      rule = calibrate_exits(stage_probabilities, stage_flops, budget, signal, layout=layout)
    except ValueError:
      continue  # out of reach with these narrow exits
    final, ran = rule.paths(stage_probabilities)
    predicted = stage_probabilities[final, np.arange(len(final))].argmax(-1)
    accuracy = float((predicted == labels).mean())
    tried.append({"narrow_threshold": narrow, "threshold": rule.threshold,
                  "accuracy": accuracy, "reduction": rule.calibration_reduction,
                  "narrow_share": float(ran[:, ~rule.full_depth()].any(-1).mean())})
    if accuracy > best_accuracy:
      best, best_accuracy = rule, accuracy
  if best is None:
    raise ConfigError(f"budget {budget} is out of reach of this depth-and-width cascade at every "
                      f"narrow threshold {list(narrow_thresholds)}")
  return best, tried


def exit_reduction(rule: ExitCascade, stage_probabilities: np.ndarray, stage_flops: np.ndarray,
                   bucket_of: np.ndarray | None = None) -> float:
  """The FLOPs reduction `rule` reaches on these rows against running every full-width stage,
  from every stage's probabilities [S, N, C] and costs [N, S] (and the rows' length buckets)."""
  stage_flops = np.asarray(stage_flops, np.float64)
  ran = rule.paths(stage_probabilities, bucket_of)[1]
  return float(ran_flops(rule.full_depth(), stage_flops).mean()
               / ran_flops(ran, stage_flops).mean())


def _exit_threshold(stage_probabilities: np.ndarray, stage_flops: np.ndarray, budget: Budget,
                    layout: ExitCascade, iterations: int) -> tuple[float, float]:
  """`calibrate_exits`' one threshold over these rows, and the reduction it reaches."""
  full = float(ran_flops(layout.full_depth(), stage_flops).mean())

  def cost(threshold: float) -> float:
    ran = dataclasses.replace(layout, threshold=threshold).paths(stage_probabilities)[1]
    return float(ran_flops(ran, stage_flops).mean())

  return _threshold_for_budget(cost, full, budget, "these exits reach", iterations)


def calibrate_cascade(probabilities: np.ndarray, router_logits: np.ndarray,
                      example_flops: np.ndarray, prefix_flops: np.ndarray, budget: Budget,
                      signal: str = "max_prob", start_cost_weight: float | None = None,
                      iterations: int = 60) -> Cascade:
  """The highest threshold (most escalation) whose average FLOPs on these examples meet the budget.

  Cost never falls as the threshold rises (more inputs escalate), so a bisection finds it. The
  reachable range runs from no escalation (every input at its first width) to every input
  running every width from there, which can cost more than the full width alone.
  """
  example_flops = np.asarray(example_flops, np.float64)
  if len(example_flops) == 0:
    raise ValueError("cannot calibrate a budget on zero examples")
  confidence(probabilities[:1, :1], signal)  # an unknown signal fails before any work

  def cost(threshold: float) -> float:
    rule = Cascade(threshold, signal, start_cost_weight=start_cost_weight)
    ran = route_all(rule, probabilities, router_logits, example_flops)[1]
    return float(width_ran_flops(ran, example_flops, prefix_flops).mean())

  threshold, reduction = _threshold_for_budget(cost, float(example_flops[:, -1].mean()), budget,
                                               "this cascade reaches", iterations)
  return Cascade(threshold, signal, str(budget), reduction, start_cost_weight)


def _threshold_for_budget(cost: Callable[[float], float], full_flops: float, budget: Budget,
                          what: str, iterations: int) -> tuple[float, float]:
  """The highest confidence threshold in [0, 1] whose average FLOPs (`cost`, which never falls
  as the threshold rises) meet `budget`, and the reduction there; a budget out of reach is an
  error naming the reachable range (`what` says whose: "this cascade reaches")."""
  target = budget.target_gflops(full_flops / 1e9) * 1e9
  tolerance = 1e-9 * full_flops
  cheapest, dearest = cost(0.0), cost(np.nextafter(1.0, 2.0))
  if not cheapest - tolerance <= target:
    raise ConfigError(f"budget {budget} is out of reach: {what} reductions from "
                      f"{full_flops / dearest:.3f}x to {full_flops / cheapest:.3f}x "
                      f"({dearest / 1e9:.4f} to {cheapest / 1e9:.4f} GFLOPs per example)")
  threshold = _boundary(lambda t: cost(t) <= target + tolerance, 0.0,
                        float(np.nextafter(1.0, 2.0)), iterations, 1e-12)
  return threshold, full_flops / cost(threshold)


def _boundary(fits, inside: float, outside: float, iterations: int, resolution: float) -> float:
  """The point nearest `outside` where `fits` still holds, by bisection between `inside` (fits)
  and `outside`; `fits` flips once between them (a rule's cost is monotone in its parameter)."""
  if fits(outside):
    return outside
  for _ in range(iterations):
    if abs(outside - inside) <= resolution:
      break
    middle = (inside + outside) / 2
    if fits(middle):
      inside = middle
    else:
      outside = middle
  return inside


def choose_widths(router_logits: np.ndarray, example_flops: np.ndarray,
                  cost_weight: float) -> np.ndarray:
  router_logits = np.asarray(router_logits, np.float64)
  example_flops = np.asarray(example_flops, np.float64)
  if router_logits.shape != example_flops.shape or router_logits.ndim != 2:
    raise ValueError(f"router logits {router_logits.shape} and per-example FLOPs "
                     f"{example_flops.shape} must both be [examples, widths]")
  relative = example_flops / example_flops[:, -1:]
  return np.argmax(router_logits - cost_weight * relative, axis=-1)


def average_gflops(chosen: np.ndarray, example_flops: np.ndarray) -> float:
  return float(np.mean(example_flops[np.arange(len(chosen)), chosen]) / 1e9)


def reachable_reductions(example_flops: np.ndarray) -> tuple[float, float]:
  """Reduction factors from all-full-width (1x) to all-narrowest (the most any rule saves)."""
  full = example_flops[:, -1].mean()
  return 1.0, float(full / example_flops.min(axis=1).mean())


def check_reachable(example_flops: np.ndarray, budget: Budget) -> None:
  """Raises ValueError naming the reachable range when no rule over these examples meets
  `budget`; needs only FLOPs, so a run checks its budget before training."""
  example_flops = np.asarray(example_flops, np.float64)
  if len(example_flops) == 0:
    raise ValueError("cannot calibrate a budget on zero examples")
  full_gflops = float(example_flops[:, -1].mean() / 1e9)
  low_x, high_x = reachable_reductions(example_flops)
  cheapest = full_gflops / high_x
  tolerance = 1e-9 * full_gflops
  if not cheapest - tolerance <= budget.target_gflops(full_gflops) <= full_gflops + tolerance:
    raise ConfigError(f"budget {budget} is out of reach: this model reaches reductions from "
                      f"{low_x:g}x to {high_x:.3f}x ({full_gflops:.4f} to {cheapest:.4f} GFLOPs "
                      "per example)")


def calibrate(router_logits: np.ndarray, example_flops: np.ndarray, budget: Budget,
              iterations: int = 60) -> Rule:
  """The smallest cost weight whose average FLOPs on these examples meet the budget.

  Bisection on the cost weight: every example's chosen cost is non-increasing in it. Raises
  ValueError naming the reachable range when no rule can meet the budget.
  """
  check_reachable(example_flops, budget)
  example_flops = np.asarray(example_flops, np.float64)
  full_gflops = float(example_flops[:, -1].mean() / 1e9)
  target = budget.target_gflops(full_gflops)
  tolerance = 1e-9 * full_gflops

  def cost(weight: float) -> float:
    return average_gflops(choose_widths(router_logits, example_flops, weight), example_flops)

  # The logits' spread bounds the weight that routes everything to either end.
  spread = float(np.ptp(router_logits)) + 1.0
  relative_gap = float(np.min(1.0 - example_flops[:, :-1].max(axis=1) / example_flops[:, -1])) \
      if example_flops.shape[1] > 1 else 1.0
  bound = spread / max(relative_gap, 1e-6) + 1.0
  # cost(-bound) = full width everywhere, cost(bound) = narrowest: the smallest weight that fits
  weight = _boundary(lambda w: cost(w) <= target + tolerance, bound, -bound, iterations,
                     1e-9 * bound)
  return Rule(cost_weight=float(weight), budget=str(budget),
              calibration_reduction=full_gflops / cost(weight))


def calibrate_rule(name: str, budget: Budget, router_logits: np.ndarray,
                   example_flops: np.ndarray, probabilities: np.ndarray | None = None,
                   prefix_flops: np.ndarray | None = None, signal: str = "max_prob",
                   start_budget: Budget | None = None) -> "Rule | Cascade":
  """The rule named `name` (RULES) calibrated to `budget` on held-out examples' arrays.

  "router": the budget rule over the router's logits. "cascade": narrowest width first, the
  threshold on `signal` calibrated (needs every width's probabilities [m, N, C] and the prefix's
  FLOPs [N]). "router+cascade": the budget rule calibrated to the more aggressive
  `start_budget` picks where each input starts; the cascade escalates from there.
  """
  if name not in RULES:
    raise ValueError(f"unknown routing rule {name!r}; known: {RULES}")
  if name == "router":
    return calibrate(router_logits, example_flops, budget)
  if probabilities is None or prefix_flops is None:
    raise ValueError(f"the {name!r} rule is calibrated on every width's probabilities and the "
                     "prefix's FLOPs")
  start = None
  if name == "router+cascade":
    if start_budget is None:
      raise ValueError("the 'router+cascade' rule needs a start budget for the router")
    start = calibrate(router_logits, example_flops, start_budget).cost_weight
  return calibrate_cascade(probabilities, router_logits, example_flops, prefix_flops, budget,
                           signal, start)
