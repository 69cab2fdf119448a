"""Hardness relabelling on hand-made confidence histories."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sharcs_jax.train import hardness

THREE = jnp.array([[0.7, 1.0], [0.4, 0.9], [0.0, 0.5]])  # widths 0.25, 0.5, 1.0


def _state(history):
  history = jnp.asarray(history, jnp.float32)  # [W, N]
  state = hardness.init_hardness(history.shape[1], history.shape[0], 3)
  return state.replace(confidence=history)


def test_overlapping_ranges_give_several_widths():
  state = _state([[0.85, 0.45, 0.75, 0.2],
                  [0.80, 0.48, 0.88, 0.3]])
  labels = np.asarray(hardness.relabel(state, THREE, jnp.int32(1)).labels)
  np.testing.assert_array_equal(labels, [[1, 1, 0],   # 0.80..0.85: in [0.7,1) and [0.4,0.9)
                                         [0, 1, 1],   # 0.45..0.48: in [0.4,0.9) and [0,0.5)
                                         [1, 1, 0],   # 0.75..0.88
                                         [0, 0, 1]])  # 0.2..0.3: hard


def test_history_must_stay_in_one_range():
  """min and max of the window decide: a swing across ranges matches only what holds both."""
  state = _state([[0.85, 0.3], [0.6, 0.95]])
  labels = np.asarray(hardness.relabel(state, THREE, jnp.int32(5)).labels)
  np.testing.assert_array_equal(labels, [[0, 1, 0], [0, 0, 1]])  # 2nd: no range -> full width


def test_no_match_falls_back_to_full_width():
  ranges = jnp.array([[0.9, 1.0], [0.0, 0.3]])  # a gap between 0.3 and 0.9
  state = hardness.init_hardness(2, 1, 2).replace(confidence=jnp.array([[0.5, 0.95]]))
  labels = np.asarray(hardness.relabel(state, ranges, jnp.int32(0)).labels)
  np.testing.assert_array_equal(labels, [[0, 1], [1, 0]])


def test_confidence_one_is_in_the_top_range():
  state = _state([[1.0, 0.9], [1.0, 0.9]])
  labels = np.asarray(hardness.relabel(state, THREE, jnp.int32(1)).labels)
  np.testing.assert_array_equal(labels[0], [1, 0, 0])
  np.testing.assert_array_equal(labels[1], [1, 0, 0])  # 0.9 is outside [0.4, 0.9): hi is open


@pytest.mark.parametrize("epoch, warm", [(0, True), (1, True), (2, False), (7, False)])
def test_warm_up_keeps_full_width(epoch, warm):
  state = hardness.init_hardness(2, 3, 3).replace(
      confidence=jnp.full((3, 2), 0.99, jnp.float32))
  labels = np.asarray(hardness.relabel(state, THREE, jnp.int32(epoch)).labels)
  expected = [[0, 0, 1]] * 2 if warm else [[1, 0, 0]] * 2
  np.testing.assert_array_equal(labels, expected)


def test_record_writes_the_epoch_slot_and_drops_padding():
  state = hardness.init_hardness(4, 2, 2)
  state = hardness.record(state, jnp.array([2, 0, 4]), jnp.array([0.3, 0.6, 0.9]), jnp.int32(3))
  np.testing.assert_allclose(state.confidence, [[0, 0, 0, 0], [0.6, 0, 0.3, 0]])


def test_assign_widths_is_uniform_over_admissible():
  labels = np.array([[1, 1, 0]] * 4000 + [[0, 0, 1]] * 10, np.float32)
  chosen = hardness.assign_widths(labels, np.random.default_rng(0))
  assert set(chosen[:4000]) == {0, 1} and set(chosen[4000:]) == {2}
  assert 0.45 < np.mean(chosen[:4000] == 0) < 0.55


@pytest.mark.parametrize("ranges, message", [
    (((0.5, 1.2), (0.0, 0.5)), "0 <= lo < hi <= 1"),
    (((-0.1, 1.0), (0.0, 0.5)), "0 <= lo < hi <= 1"),
    (((0.5, 0.5), (0.0, 0.5)), "0 <= lo < hi <= 1"),
    (((0.5, 1.0),), "one \\[lo, hi\\) pair per width"),
])
def test_bad_ranges(ranges, message):
  with pytest.raises(ValueError, match=message):
    hardness.check_ranges(ranges, 2)


def test_easiness_signals():
  probs = jnp.array([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
  labels = jnp.array([0, 1, 1])
  np.testing.assert_allclose(hardness.easiness(probs, labels, "confidence"), [0.5, 0.0, 0.8])
  # Entropy ignores the label: a confidently wrong prediction is "easy" too.
  expected_third = 1 + (0.2 * np.log(0.2) + 0.8 * np.log(0.8)) / np.log(2)
  np.testing.assert_allclose(hardness.easiness(probs, labels, "entropy"),
                             [0.0, 1.0, expected_third], atol=1e-6)
  with pytest.raises(ValueError, match="unknown hardness signal 'margin'"):
    hardness.easiness(probs, labels, "margin")
