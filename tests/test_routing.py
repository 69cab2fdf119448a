"""Budget routing: parsing, the cost-weighted rule, and calibration on synthetic router logits."""

from __future__ import annotations

import numpy as np
import pytest

from sharcs_jax.serve import routing


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


def _probabilities(confidences):
  """[m, N, 2] probabilities whose top class has the given confidence per width and input."""
  c = np.asarray(confidences, np.float64)
  return np.stack([c, 1 - c], axis=-1)


def test_cascade_escalates_in_width_order_and_pays_every_part_it_ran():
  # Three widths, four inputs: confident at 0.25; at 0.5; only at full width; never.
  probabilities = _probabilities([[0.95, 0.6, 0.6, 0.55],
                                  [0.70, 0.9, 0.6, 0.55],
                                  [0.80, 0.8, 0.9, 0.60]])
  example = np.tile([[3.0, 5.0, 9.0]], (4, 1))  # prefix 1 + parts 2, 4, 8
  prefix = np.ones(4)
  rule = routing.Cascade(threshold=0.85)
  final, ran = routing.route_all(rule, probabilities, np.zeros((4, 3)), example)
  assert final.tolist() == [0, 1, 2, 2]
  assert ran.tolist() == [[True, False, False], [True, True, False], [True, True, True],
                          [True, True, True]]
  # prefix once, then every part run: 1+2, 1+2+4, 1+2+4+8 (twice)
  assert routing.width_ran_flops(ran, example, prefix).tolist() == [3.0, 7.0, 15.0, 15.0]


def test_cascade_from_the_router_starts_where_the_budget_rule_routes():
  probabilities = _probabilities([[0.5, 0.5], [0.5, 0.95]])
  logits = np.array([[2.0, 0.0], [0.0, 2.0]])  # the router sends input 1 to full width
  example = np.array([[1.0, 2.0]] * 2)
  rule = routing.Cascade(threshold=0.9, start_cost_weight=0.0)
  final, ran = routing.route_all(rule, probabilities, logits, example)
  assert final.tolist() == [1, 1] and ran.tolist() == [[True, True], [False, True]]
  assert routing.width_ran_flops(ran, example, np.array([0.5, 0.5])).tolist() == [2.5, 2.0]


@pytest.mark.parametrize("signal, expected", [
    ("max_prob", [0.7, 0.5]), ("margin", [0.4, 0.0]),
    ("entropy", [1 - (0.7 * np.log(1 / 0.7) + 0.3 * np.log(1 / 0.3)) / np.log(2), 0.0])])
def test_confidence_signals(signal, expected):
  np.testing.assert_allclose(routing.confidence([[0.7, 0.3], [0.5, 0.5]], signal), expected)


def test_every_signal_stays_in_0_1_for_float32_probabilities_near_uniform():
  """A float32 softmax near uniform can sum a hair under 1, and its entropy then exceeds log C;
  confidence must not dip below 0, or threshold 0 (every row leaves at its first exit) would no
  longer be reachable."""
  p = np.array([[0.49999997, 0.49999997]], np.float32)
  for signal in routing.CONFIDENCE_SIGNALS:
    sure = routing.confidence(p, signal)
    assert (sure >= 0.0).all() and (sure <= 1.0).all(), signal


def _cascade_data(n=3000, seed=0):
  rng = np.random.default_rng(seed)
  probabilities = _probabilities(rng.uniform(0.5, 1.0, size=(2, n)))
  lengths = rng.choice([1.0, 2.1], n)
  example = np.array([0.35, 0.81])[None, :] * lengths[:, None] * 1e9
  return probabilities, rng.normal(size=(n, 2)), example, 0.2 * lengths * 1e9


@pytest.mark.parametrize("target", [1.2, 1.5, 1.8, 2.1])
def test_cascade_calibration_meets_the_budget(target):
  probabilities, logits, example, prefix = _cascade_data()
  rule = routing.calibrate_cascade(probabilities, logits, example, prefix,
                                   routing.Budget(reduction=target))
  ran = routing.route_all(rule, probabilities, logits, example)[1]
  reached = example[:, -1].mean() / routing.width_ran_flops(ran, example, prefix).mean()
  assert reached == pytest.approx(rule.calibration_reduction)
  assert target <= reached <= target * 1.05
  # one notch more escalation would overspend: the threshold is the highest that fits
  looser = routing.Cascade(rule.threshold + 1e-3)
  ran = routing.route_all(looser, probabilities, logits, example)[1]
  assert example[:, -1].mean() / routing.width_ran_flops(ran, example, prefix).mean() < target


def test_cascade_budget_out_of_reach_names_the_range():
  probabilities, logits, example, prefix = _cascade_data()
  with pytest.raises(ValueError, match=r"budget 3x is out of reach: this cascade reaches "
                     r"reductions from 0\.\d+x to 2\.31\dx"):
    routing.calibrate_cascade(probabilities, logits, example, prefix, routing.Budget(reduction=3))


def test_named_rules_and_their_json():
  probabilities, logits, example, prefix = _cascade_data(n=500)
  budget = routing.Budget(reduction=1.5)
  for name in routing.RULES:
    rule = routing.calibrate_rule(name, budget, logits, example, probabilities, prefix,
                                  start_budget=routing.Budget(reduction=2.2))
    assert routing.rule_from_json(rule.to_json()) == rule
  assert isinstance(routing.calibrate_rule("router+cascade", budget, logits, example,
                                           probabilities, prefix,
                                           start_budget=routing.Budget(reduction=2.2)
                                           ).start_cost_weight, float)
  with pytest.raises(ValueError, match="unknown routing rule 'oracle'"):
    routing.calibrate_rule("oracle", budget, logits, example)
  with pytest.raises(ValueError, match="needs a start budget"):
    routing.calibrate_rule("router+cascade", budget, logits, example, probabilities, prefix)


def test_fixed_width_rule_routes_everything_to_one_width_and_round_trips():
  rule = routing.Fixed(1, budget="1x")
  assert rule.first_widths(np.zeros((4, 2)), np.ones((4, 2))).tolist() == [1, 1, 1, 1]
  assert not rule.escalating and not rule.escalates(np.full((3, 2), 0.5), 0).any()
  assert routing.rule_from_json(rule.to_json()) == rule


def _stage_probabilities(n=2000, stages=4, seed=0):
  """[S, N, 2]: each row's confidence grows with depth from its own start."""
  rng = np.random.default_rng(seed)
  start = rng.uniform(0.5, 0.9, n)
  sure = np.clip(start[None] + 0.1 * np.arange(stages)[:, None], 0.5, 0.999)
  return np.stack([sure, 1 - sure], axis=-1)


def test_exit_rule_leaves_at_the_first_sure_stage_as_dispatch_asks_it():
  p = np.array([[[0.6, 0.4], [0.99, 0.01], [0.5, 0.5]],
                [[0.99, 0.01], [0.6, 0.4], [0.6, 0.4]],
                [[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]]])  # [S=3, N=3, C]
  rule = routing.ExitCascade(0.9, 3, "max_prob")
  np.testing.assert_array_equal(rule.exits(p), [1, 0, 2])
  rows = np.arange(3)
  np.testing.assert_array_equal(rule.next_stages(0, rows, (p[0],)), [1, routing.STOP, 1])
  np.testing.assert_array_equal(rule.next_stages(2, rows, (p[2],)), [routing.STOP] * 3)
  assert rule.continues(1) and not rule.continues(2)
  assert routing.rule_from_json(rule.to_json()) == rule


@pytest.mark.parametrize("target", [1.5, 2.0, 2.5])
def test_exit_calibration_meets_the_budget_within_5_percent_on_unseen_rows(target):
  """Fitted on one half of hand-made rows, the threshold meets the target on the other half."""
  p = _stage_probabilities(20_000)
  flops = np.tile([1.0, 2.0, 2.0, 2.0], (p.shape[1], 1)) * 1e9
  fit, held = slice(0, 10_000), slice(10_000, None)
  rule = routing.calibrate_exits(p[:, fit], flops[fit], routing.parse_budget(f"{target}x"))
  assert rule.calibration_reduction == pytest.approx(target, rel=0.01)
  spent = np.cumsum(flops[held], axis=1)[np.arange(10_000), rule.exits(p[:, held])]
  assert 7e9 / spent.mean() == pytest.approx(target, rel=0.05)
  with pytest.raises(ValueError, match="out of reach"):  # stage 0 alone is 7x
    routing.calibrate_exits(p[:, fit], flops[fit], routing.parse_budget("9x"))


def _two_length_mix(n_short: int, n_long: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Every stage's probabilities [S, N, C] and length buckets [N]: short rows (bucket 0) are
  sure early, long ones (bucket 1) late, as SST-2's phrases against its sentences."""
  rng = np.random.default_rng(seed)
  start = np.concatenate([rng.uniform(0.7, 0.95, n_short), rng.uniform(0.5, 0.7, n_long)])
  sure = np.clip(start[None] + 0.1 * np.arange(4)[:, None], 0.5, 0.999)
  return np.stack([sure, 1 - sure], axis=-1), np.repeat([0, 1], [n_short, n_long])


@pytest.mark.parametrize("target", [1.5, 2.0, 2.5])
def test_exit_calibration_per_length_bucket_holds_when_the_mix_of_lengths_shifts(target):
  """Calibrated on mostly short rows, applied to mostly long ones: the pooled threshold misses
  the target by more than 5%, the thresholds per length bucket meet it within 5%."""
  flops = lambda buckets: np.tile([1.0, 2.0, 2.0, 2.0], (len(buckets), 1)) * 1e9
  p_fit, b_fit = _two_length_mix(8_000, 2_000, seed=1)
  p_held, b_held = _two_length_mix(2_000, 8_000, seed=2)
  budget = routing.parse_budget(f"{target}x")
  pooled = routing.calibrate_exits(p_fit, flops(b_fit), budget, "max_prob")
  by_length = routing.calibrate_exits(p_fit, flops(b_fit), budget, "max_prob",
                                      bucket_of=b_fit, num_buckets=3)
  assert by_length.bucket_thresholds[2] == by_length.threshold == pooled.threshold  # no rows
  assert by_length.bucket_thresholds[0] != by_length.bucket_thresholds[1]
  assert by_length.calibration_reduction == pytest.approx(target, rel=0.01)

  def reduction(rule):
    spent = np.cumsum(flops(b_held), axis=1)
    return 7.0 / spent[np.arange(len(b_held)), rule.exits(p_held, b_held)].mean() * 1e9

  assert abs(reduction(pooled) / target - 1) > 0.05
  assert reduction(by_length) == pytest.approx(target, rel=0.05)
  assert routing.rule_from_json(by_length.to_json()) == by_length
  few = b_fit.copy()
  few[:60], few[-60:] = 2, 3  # two buckets of 60 rows: fitted together
  mixed = routing.calibrate_exits(p_fit, flops(few), budget, "max_prob", bucket_of=few,
                                  num_buckets=5)
  t = mixed.bucket_thresholds
  assert t[2] == t[3] != t[4] == mixed.threshold and len({t[0], t[1], t[2]}) == 3
  assert mixed.calibration_reduction == pytest.approx(target, rel=0.01)
  with pytest.raises(ValueError, match="over_rows"):  # the buckets are needed to route
    by_length.next_stages(0, np.arange(3), (p_held[0, :3],))
  rows = np.array([5, 9000])
  np.testing.assert_array_equal(
      by_length.over_rows(b_held).next_stages(0, rows, (p_held[0, rows],)),
      np.where(by_length.exits(p_held, b_held)[rows] == 0, routing.STOP, 1))
