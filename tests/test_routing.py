"""Budget routing: parsing, the cost-weighted rule, and calibration on synthetic router logits."""

from __future__ import annotations

import numpy as np
import pytest

from sharcs_jax import routing


def _synthetic(n=2000, widths=(0.25, 0.5, 1.0), seed=0):
  """Router logits and per-example FLOPs at two length buckets (costs grow with width)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, len(widths))) + np.array([1.0] + [0.0] * (len(widths) - 1))
  per_width = np.array({2: [0.35, 0.81], 3: [0.35, 0.47, 0.81]}[len(widths)])
  lengths = rng.choice([1.0, 2.1], n)
  return logits, per_width[None, :] * lengths[:, None] * 1e9


@pytest.mark.parametrize("spec, expected", [
    ("2x", routing.Budget(reduction=2.0)), ("2.5X", routing.Budget(reduction=2.5)),
    (" 0.4 ", routing.Budget(gflops=0.4)), ("0.4gflops", routing.Budget(gflops=0.4)),
])
def test_parse_budget(spec, expected):
  assert routing.parse_budget(spec) == expected


@pytest.mark.parametrize("spec", ["fast", "x2", "-1x", "2xx", ""])
def test_parse_budget_rejects(spec):
  with pytest.raises(ValueError, match="budget"):
    routing.parse_budget(spec)


def test_cost_weight_zero_is_the_router_argmax():
  logits, flops = _synthetic()
  np.testing.assert_array_equal(routing.Rule().choose(logits, flops), logits.argmax(-1))


def test_cost_never_rises_with_the_weight():
  logits, flops = _synthetic()
  costs = [routing.average_gflops(routing.choose_widths(logits, flops, w), flops)
           for w in np.linspace(-50, 100, 150)]
  assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))
  assert costs[0] == pytest.approx(flops[:, -1].mean() / 1e9)
  assert costs[-1] == pytest.approx(flops.min(1).mean() / 1e9)


@pytest.mark.parametrize("widths", [(0.25, 1.0), (0.25, 0.5, 1.0)])
@pytest.mark.parametrize("target", [1.1, 1.5, 2.0, 2.2])
def test_calibration_meets_reduction_targets(widths, target):
  logits, flops = _synthetic(widths=widths)
  rule = routing.calibrate(logits, flops, routing.Budget(reduction=target))
  achieved = flops[:, -1].mean() / flops[np.arange(len(flops)), rule.choose(logits, flops)].mean()
  assert achieved == pytest.approx(rule.calibration_reduction)
  assert target <= achieved <= 1.05 * target
  assert rule.budget == f"{target:g}x"


def test_calibration_meets_gflops_targets_and_generalises():
  logits, flops = _synthetic(n=4000)
  rule = routing.calibrate(logits[:2000], flops[:2000], routing.parse_budget("0.6gflops"))
  held = flops[2000:][np.arange(2000), rule.choose(logits[2000:], flops[2000:])].mean() / 1e9
  assert held == pytest.approx(0.6, rel=0.05)


def test_a_budget_the_router_already_meets_routes_everything_wide():
  logits, flops = _synthetic()
  rule = routing.calibrate(logits, flops, routing.Budget(reduction=1.0))
  assert rule.calibration_reduction == pytest.approx(1.0)


@pytest.mark.parametrize("budget", ["0.5x", "3.5x", "0.1gflops", "5gflops"])
def test_unreachable_budget_names_the_reachable_range(budget):
  logits, flops = _synthetic()
  with pytest.raises(ValueError, match=r"out of reach: this model reaches reductions from 1x to "
                                       r"2\.314x \(1\.\d+ to 0\.\d+ GFLOPs per example\)"):
    routing.calibrate(logits, flops, routing.parse_budget(budget))


def test_shapes_must_agree():
  with pytest.raises(ValueError, match=r"must both be \[examples, widths\]"):
    routing.choose_widths(np.zeros((4, 2)), np.ones((4, 3)), 0.0)
