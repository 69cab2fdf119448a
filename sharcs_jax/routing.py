"""Routing rules over the trained router: the paper's argmax, and argmax under a FLOPs budget.

The router is trained on confidences of *training* examples, which the model has largely
memorised; on unseen inputs it is less sure that an input is easy, so its argmax saves fewer
FLOPs than its training labels promise. The budget rule fixes the trade-off after training:
each example takes argmax_i(router_logit_i - lam * cost_i), with cost_i the FLOPs of width i
relative to full width at the example's length. lam = 0 is the paper's argmax; a larger lam
buys fewer FLOPs for every example at once, so the average cost never rises with lam, and one
scalar calibrated on held-out data meets a reduction target (`calibrate`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


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
    raise ValueError(f"budget {spec!r}: expected a reduction factor such as '2x' or average "
                     "GFLOPs per example such as '0.4gflops'")
  value = float(match.group(1))
  if value <= 0:
    raise ValueError(f"budget {spec!r} must be positive")
  return Budget(reduction=value) if match.group(2) == "x" else Budget(gflops=value)


@dataclasses.dataclass(frozen=True)
class Rule:
  """argmax(router_logits - cost_weight * relative cost); cost_weight 0 is the paper's argmax."""

  cost_weight: float = 0.0
  budget: str = ""  # the target it was calibrated for, "" for the paper's rule
  calibration_reduction: float = 1.0  # reduction reached on the calibration split

  def choose(self, router_logits: np.ndarray, example_flops: np.ndarray) -> np.ndarray:
    """Width index per example. router_logits [N, m]; example_flops [N, m], last = full width."""
    return choose_widths(router_logits, example_flops, self.cost_weight)


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


def calibrate(router_logits: np.ndarray, example_flops: np.ndarray, budget: Budget,
              iterations: int = 60) -> Rule:
  """The smallest cost weight whose average FLOPs on these examples meet the budget.

  Bisection on the cost weight: every example's chosen cost is non-increasing in it. Raises
  ValueError naming the reachable range when no rule can meet the budget.
  """
  example_flops = np.asarray(example_flops, np.float64)
  if len(example_flops) == 0:
    raise ValueError("cannot calibrate a budget on zero examples")
  full_gflops = float(example_flops[:, -1].mean() / 1e9)
  target = budget.target_gflops(full_gflops)
  low_x, high_x = reachable_reductions(example_flops)
  cheapest = full_gflops / high_x
  tolerance = 1e-9 * full_gflops
  if not cheapest - tolerance <= target <= full_gflops + tolerance:
    raise ValueError(f"budget {budget} is out of reach: this model reaches reductions from "
                     f"{low_x:g}x to {high_x:.3f}x ({full_gflops:.4f} to {cheapest:.4f} GFLOPs "
                     "per example)")

  def cost(weight: float) -> float:
    return average_gflops(choose_widths(router_logits, example_flops, weight), example_flops)

  # The logits' spread bounds the weight that routes everything to either end.
  spread = float(np.ptp(router_logits)) + 1.0
  relative_gap = float(np.min(1.0 - example_flops[:, :-1].max(axis=1) / example_flops[:, -1])) \
      if example_flops.shape[1] > 1 else 1.0
  bound = spread / max(relative_gap, 1e-6) + 1.0
  low, high = -bound, bound  # cost(low) = full width everywhere, cost(high) = narrowest
  if cost(low) <= target + tolerance:
    high = low
  for _ in range(iterations):
    if high - low <= 1e-9 * bound:
      break
    middle = (low + high) / 2
    if cost(middle) <= target + tolerance:
      high = middle
    else:
      low = middle
  return Rule(cost_weight=float(high), budget=str(budget),
              calibration_reduction=full_gflops / cost(high))
