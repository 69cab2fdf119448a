"""The dispatch core on a fake runner: order kept, batch buckets, padding rows, escalation."""

from __future__ import annotations

import numpy as np
import pytest

from sharcs_jax.serve import dispatch, routing


class FakeRunner:
  """Row r's 'hidden state' is its ids; the router prefers width ids[r, 0] % m; width i's part
  gives probabilities [c, 1 - c] with c = CONFIDENCE[r % 4][i]. Records every call."""

  CONFIDENCE = [(0.95, 0.9, 0.9), (0.6, 0.95, 0.9), (0.6, 0.6, 0.9), (0.5, 0.5, 0.5)]

  def __init__(self, num_widths=3):
    self.m, self.calls = num_widths, []

  def prefix(self, batch, length, ids, mask, types):
    assert ids.shape == mask.shape == types.shape == (batch, length)
    self.calls.append(("prefix", batch, mask.copy()))
    router = np.eye(self.m)[ids[:, 0] % self.m] * 5.0
    return ids.astype(np.float32)[..., None], router

  def part(self, width_index, batch, length, hidden, mask):
    assert hidden.shape == (batch, length, 1) and mask.shape == (batch, length)
    self.calls.append(("part", width_index, batch, mask.copy()))
    rows = hidden[:, 1, 0].astype(int)  # column 1 holds the row number
    c = np.array([self.CONFIDENCE[r % 4][width_index] for r in rows])
    return np.stack([c, 1 - c], axis=-1)


def _rows(n, length=6, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 50, (n, length))
  ids[:, 1] = np.arange(n)
  lengths = rng.integers(2, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return ids, mask, np.zeros_like(ids)


def _run(runner, n, rule, **kwargs):
  ids, mask, types = _rows(n)
  return dispatch.run_rows(runner, ids, mask, types, length=6, batch_buckets=(1, 4, 8),
                           num_widths=3, rule=rule, width_flops=np.array([1.0, 2.0, 4.0]),
                           **kwargs), ids


@pytest.mark.parametrize("n", [1, 3, 13, 21])
def test_router_rule_groups_by_width_and_keeps_order(n):
  runner = FakeRunner()
  out, ids = _run(runner, n, routing.Rule())
  expected = ids[:, 0] % 3
  np.testing.assert_array_equal(out.final, expected)
  np.testing.assert_array_equal(out.ran, np.eye(3, dtype=bool)[expected])
  confidence = np.array([FakeRunner.CONFIDENCE[r % 4][w] for r, w in zip(range(n), expected)])
  np.testing.assert_allclose(out.probabilities[:, 0], confidence)
  for call in runner.calls:  # every call at a batch bucket; padding rows attend to one token
    size, mask = (call[1], call[2]) if call[0] == "prefix" else (call[2], call[3])
    assert size in (1, 4, 8)
    assert mask[:, 0].all()
  assert sum(c[0] == "prefix" for c in runner.calls) == len(dispatch.split_into_batches(n, (1, 4, 8)))


def test_cascade_escalates_only_the_unsure():
  runner = FakeRunner()
  out, _ = _run(runner, 12, routing.Cascade(threshold=0.85))
  # Pattern per row % 4: sure at 0.25; at 0.5; only at 1.0; never (ends at 1.0).
  np.testing.assert_array_equal(out.final, [0, 1, 2, 2] * 3)
  np.testing.assert_array_equal(out.ran.sum(1), [1, 2, 3, 3] * 3)
  np.testing.assert_allclose(out.probabilities[:, 0], [0.95, 0.95, 0.9, 0.5] * 3)
  rows_per_width = [sum(c[2] for c in runner.calls if c[0] == "part" and c[1] == w)
                    for w in range(3)]
  assert rows_per_width[0] >= 12 and rows_per_width[1] >= 9 and rows_per_width[2] >= 6


def test_every_width_keeps_each_widths_probabilities():
  out, _ = _run(FakeRunner(), 10, dispatch.EVERY_WIDTH, keep_every_width=True)
  assert out.ran.all() and (out.final == 2).all()
  expected = np.array([[FakeRunner.CONFIDENCE[r % 4][w] for r in range(10)] for w in range(3)])
  np.testing.assert_allclose(out.every_width[..., 0], expected)


@pytest.mark.parametrize("rule", [routing.Rule(), routing.Cascade(threshold=0.85),
                                  dispatch.EVERY_WIDTH], ids=["router", "cascade", "every"])
def test_small_blocks_carry_partial_batches_to_the_next(rule):
  """Blocks of 8 rows give the results of one block and the same batches per width: rows that do
  not fill a batch wait for the next block instead of running as a remainder in each."""
  runners = {"whole": FakeRunner(), "blocked": FakeRunner()}
  out = {name: _run(runner, 37, rule, keep_every_width=True,
                    block_size=None if name == "whole" else 8)[0]
         for name, runner in runners.items()}
  np.testing.assert_array_equal(out["blocked"].final, out["whole"].final)
  np.testing.assert_array_equal(out["blocked"].ran, out["whole"].ran)
  np.testing.assert_allclose(out["blocked"].probabilities, out["whole"].probabilities)
  np.testing.assert_allclose(out["blocked"].every_width, out["whole"].every_width)
  sizes = {name: [sorted(c[2] for c in r.calls if c[0] == "part" and c[1] == w) for w in range(3)]
           for name, r in runners.items()}
  assert sizes["blocked"] == sizes["whole"]
  prefix_calls = sum(c[0] == "prefix" for c in runners["blocked"].calls)
  assert prefix_calls == 5  # four blocks of 8, then 5 rows in one batch of 8


@pytest.mark.parametrize("rule", [routing.Cascade(threshold=0.85), dispatch.EVERY_WIDTH],
                         ids=["cascade", "every"])
def test_run_buckets_runs_each_row_at_its_length_bucket_in_row_order(rule):
  """Rows of mixed lengths: each length bucket's rows give what `run_rows` gives them alone, at
  that bucket's length, and come back in row order."""
  ids, mask, types = _rows(29)
  lengths = mask.sum(1)
  runner = FakeRunner()
  out = dispatch.run_buckets(runner, ids, types, lengths, length_buckets=(3, 6),
                             batch_buckets=(1, 4, 8), num_widths=3, num_classes=2, rule=rule,
                             width_flops=np.array([[1.0, 2.0], [2.0, 4.0], [4.0, 8.0]]),
                             prefix_flops=np.array([0.5, 1.0]), keep_every_width=True)
  assert sorted({c[-1].shape[1] for c in runner.calls}) == [3, 6]
  logits = dispatch.run_each_row(lambda *batch: FakeRunner().prefix(*batch)[1], ids, types,
                                 lengths, columns=3, length_buckets=(3, 6), batch_buckets=(1, 4))
  np.testing.assert_array_equal(logits, out.router)  # the prefix alone, rows in the same order
  for bucket, length in enumerate((3, 6)):
    rows = np.flatnonzero((lengths > 3) == bool(bucket))
    alone = dispatch.run_rows(FakeRunner(), ids[rows, :length], mask[rows, :length],
                              types[rows, :length], length=length, batch_buckets=(1, 4, 8),
                              num_widths=3, rule=rule, width_flops=np.array([1.0, 2.0, 4.0]) *
                              (1 + bucket), keep_every_width=True)
    np.testing.assert_array_equal(out.final[rows], alone.final)
    np.testing.assert_array_equal(out.ran[rows], alone.ran)
    np.testing.assert_allclose(out.probabilities[rows], alone.probabilities)
    np.testing.assert_allclose(out.every_width[:, rows], alone.every_width)
    np.testing.assert_allclose(out.router[rows], alone.router)
    np.testing.assert_allclose(out.flops[rows], routing.ran_flops(
        alone.final, alone.ran, np.array([1.0, 2.0, 4.0]) * (1 + bucket), 0.5 * (1 + bucket)))


def test_no_rows():
  out = dispatch.run_rows(FakeRunner(), np.zeros((0, 6), int), np.zeros((0, 6), int),
                          np.zeros((0, 6), int), length=6, batch_buckets=(1, 4), num_widths=3,
                          rule=routing.Rule(), width_flops=np.ones(3))
  assert out.final.shape == (0,) and out.ran.shape == (0, 3)
  out = dispatch.run_buckets(FakeRunner(), np.zeros((0, 6), int), np.zeros((0, 6), int),
                             np.zeros(0, int), length_buckets=(3, 6), batch_buckets=(1, 4),
                             num_widths=3, num_classes=2, rule=routing.Rule(),
                             width_flops=np.ones((3, 2)), prefix_flops=np.zeros(2))
  assert out.probabilities.shape == (0, 2) and out.final.shape == (0,) and out.flops.shape == (0,)


@pytest.mark.parametrize("count, buckets, expected", [
    (0, (1, 8, 32), []),
    (70, (1, 8, 32), [(0, 32), (32, 32), (64, 8)]),  # 6 left: 8 holds them at < 2x
    (41, (1, 8, 32), [(0, 32), (32, 8), (40, 1)]),
    (20, (1, 8, 32), [(0, 32)]),
    (3, (8, 32), [(0, 8)]),  # nothing smaller: pad up
    (5, (1, 8, 32), [(0, 8)]), (3, (1, 8, 32), [(0, 1), (1, 1), (2, 1)]),
])
def test_split_into_batches(count, buckets, expected):
  assert dispatch.split_into_batches(count, buckets) == expected
