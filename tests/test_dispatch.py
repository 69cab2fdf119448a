"""The dispatch core on a fake runner: order kept, batch buckets, padding rows, escalation, and
the batches it cuts."""

from __future__ import annotations

import dataclasses
import itertools

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
  """Token ids [n, length] (column 1 the row number), lengths [n] in 2..length, type ids."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 50, (n, length))
  ids[:, 1] = np.arange(n)
  return ids, rng.integers(2, length + 1, n), np.zeros_like(ids)


def _run(runner, n, rule, **kwargs):
  ids, lengths, types = _rows(n)
  return dispatch.run_rows(runner, ids, types, lengths, program_lengths=(6,),
                           batch_buckets=(1, 4, 8), num_widths=3, rule=rule,
                           width_flops=np.array([1.0, 2.0, 4.0]), **kwargs), ids


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
  lengths = _rows(n)[1]
  assert sum(c[0] == "prefix" for c in runner.calls) == len(
      dispatch.plan_batches(lengths, (1, 4, 8), (6,)))


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
def test_run_buckets_gives_each_row_its_own_result_in_row_order(rule):
  """Rows of mixed lengths run in ascending length at the program lengths that hold them, and
  come back in row order with what each row gives alone; each is costed at its own bucket."""
  ids, lengths, types = _rows(29)
  runner = FakeRunner()
  width_flops = np.array([[1.0, 2.0], [2.0, 4.0], [4.0, 8.0]])
  out = dispatch.run_buckets(runner, ids, types, lengths, length_buckets=(3, 6),
                             batch_buckets=(1, 4, 8), num_widths=3, num_classes=2, rule=rule,
                             width_flops=width_flops, prefix_flops=np.array([0.5, 1.0]),
                             keep_every_width=True)
  for call in runner.calls:  # every call at a program length that holds its real rows
    mask = call[-1]
    assert mask.shape[1] in (3, 6) and mask.sum(1).max() <= mask.shape[1]
  assert {c[-1].shape[1] for c in runner.calls} == {3, 6}
  logits = dispatch.run_each_row(lambda *batch: FakeRunner().prefix(*batch)[1], ids, types,
                                 lengths, columns=3, program_lengths=(3, 6),
                                 batch_buckets=(1, 4))
  np.testing.assert_array_equal(logits, out.router)  # the prefix alone, rows in the same order
  alone = dispatch.run_rows(FakeRunner(), ids, types, lengths, program_lengths=(6,),
                            batch_buckets=(1,), num_widths=3, rule=rule,
                            width_flops=width_flops[:, (lengths > 3).astype(int)].T,
                            keep_every_width=True)  # one row per call, in row order
  np.testing.assert_array_equal(out.final, alone.final)
  np.testing.assert_array_equal(out.ran, alone.ran)
  np.testing.assert_allclose(out.probabilities, alone.probabilities)
  np.testing.assert_allclose(out.every_width, alone.every_width)
  np.testing.assert_allclose(out.router, alone.router)
  bucket = (lengths > 3).astype(int)
  np.testing.assert_allclose(out.flops, routing.width_ran_flops(
      alone.ran, width_flops[:, bucket].T, np.array([0.5, 1.0])[bucket]))


def test_no_rows():
  out = dispatch.run_rows(FakeRunner(), np.zeros((0, 6), int), np.zeros((0, 6), int),
                          np.zeros(0, int), program_lengths=(6,), batch_buckets=(1, 4),
                          num_widths=3, rule=routing.Rule(), width_flops=np.ones(3))
  assert out.final.shape == (0,) and out.ran.shape == (0, 3)
  out = dispatch.run_buckets(FakeRunner(), np.zeros((0, 6), int), np.zeros((0, 6), int),
                             np.zeros(0, int), length_buckets=(3, 6), batch_buckets=(1, 4),
                             num_widths=3, num_classes=2, rule=routing.Rule(),
                             width_flops=np.ones((3, 2)), prefix_flops=np.zeros(2))
  assert out.probabilities.shape == (0, 2) and out.final.shape == (0,) and out.flops.shape == (0,)


def _cuts(batches):
  return [(b.start, b.stop, b.size, b.length) for b in batches]


EXACT = dispatch.lengths_for("onnxruntime", (128,))  # every length 1..128
ANY_BATCH = dispatch.batch_sizes_for("onnxruntime", (1, 8, 32))


@pytest.mark.parametrize("lengths, sizes, programs, expected", [
    ([], (1, 8, 32), (32,), []),
    ([30] * 70, (1, 8, 32), (32,), [(0, 32, 32, 32), (32, 64, 32, 32), (64, 70, 8, 32)]),
    ([30] * 41, (1, 8, 32), (32,), [(0, 32, 32, 32), (32, 40, 8, 32), (40, 41, 1, 32)]),
    ([30] * 3, (8, 32), (32,), [(0, 3, 8, 32)]),  # nothing smaller: pad up
    # A long row does not pad short ones: 48 + 8 x 128 tokens together, 2 x 48 + 7 x 8 + 128 apart.
    ([5] * 7 + [100], ANY_BATCH, (8, 128), [(0, 7, 7, 8), (7, 8, 1, 128)]),
    # Nearby lengths run as one call at the longest: 48 + 3 x 14 against 3 x 48 + 36 tokens.
    ([10, 12, 14], ANY_BATCH, EXACT, [(0, 3, 3, 14)]),
    # Across a bucket boundary, 33 rows of 20 and 31 of 30 tokens: the 33rd short row joins the
    # long ones at 32 (8 tokens of padding) rather than running alone (a call).
    ([20] * 33 + [30] * 31, ANY_BATCH, (24, 32), [(0, 32, 32, 24), (32, 64, 32, 32)]),
])
def test_plan_batches(lengths, sizes, programs, expected):
  assert _cuts(dispatch.plan_batches(np.array(lengths, int), sizes, programs)) == expected


def _cost(batches):
  return sum(dispatch.CALL_COST_TOKENS + b.size * b.length for b in batches)


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_is_the_cheapest_cut(seed):
  """Against every way of cutting up to 8 rows into contiguous batches."""
  rng = np.random.default_rng(seed)
  lengths = np.sort(rng.integers(2, 129, rng.integers(1, 9)))
  sizes, programs = (1, 2, 4), (16, 32, 64, 128)
  plan = dispatch.plan_batches(lengths, sizes, programs)
  assert plan[0].start == 0 and plan[-1].stop == len(lengths)
  assert all(a.stop == b.start for a, b in zip(plan, plan[1:]))
  best = np.inf
  for cut in itertools.product([False, True], repeat=len(lengths) - 1):
    edges = [0] + [i + 1 for i, c in enumerate(cut) if c] + [len(lengths)]
    if any(b - a > max(sizes) for a, b in zip(edges, edges[1:])):
      continue
    best = min(best, _cost([dispatch.Batch(
        a, b, min(s for s in sizes if s >= b - a),
        min(p for p in programs if p >= lengths[a:b].max())) for a, b in zip(edges, edges[1:])]))
  assert _cost(plan) == best


def test_plan_batches_refuses_a_row_longer_than_every_program():
  with pytest.raises(ValueError, match="a row of 40 tokens is longer than the longest program "
                                       "length 32"):
    dispatch.plan_batches(np.array([3, 40]), (1, 8), (16, 32))


class FakeStages:
  """Stage k's hidden states are what it read, plus 1 at position 0 (stage 0: the ids; position
  1 holds the row number), and row r's
  probabilities there are [c, 1 - c] with c = CONFIDENCE[r % 4][k]. Records each call of a
  stage reading hidden states as (stage, batch, the real rows' hidden states it read)."""

  CONFIDENCE = [(0.95, 0.9, 0.9, 0.9), (0.6, 0.95, 0.9, 0.9), (0.6, 0.6, 0.6, 0.95),
                (0.5, 0.5, 0.5, 0.5)]

  def __init__(self):
    self.calls = []

  def stage(self, index, batch, length, inputs):
    if index == 0:
      ids, mask, types = inputs
      assert ids.shape == mask.shape == types.shape == (batch, length)
      hidden = ids.astype(np.float32)[..., None]
    else:
      hidden, mask = inputs
      assert hidden.shape == (batch, length, 1) and mask.shape == (batch, length)
      self.calls.append((index, batch, np.asarray(hidden)[mask.sum(1) > 1].copy()))  # real rows
      hidden = np.concatenate([hidden[:, :1] + 1, hidden[:, 1:]], axis=1)
    rows = hidden[:, 1, 0].astype(int)  # position 1 holds the row number
    c = np.array([self.CONFIDENCE[r % 4][index] for r in rows])
    return hidden, (np.stack([c, 1 - c], axis=-1),)


@dataclasses.dataclass(frozen=True)
class ConfidentStops:
  """Stops a row at the first stage whose top probability reaches `threshold` (the last stops
  everything); `jump` sends rows from stage 0 straight to that stage instead of stage 1."""

  threshold: float
  count: int
  jump: int = 1

  def continues(self, stage):
    return stage < self.count - 1

  def next_stages(self, stage, rows, outputs):
    sure = outputs[0].max(-1) >= self.threshold
    step = self.jump if stage == 0 else 1
    return np.where(sure | (stage == self.count - 1), dispatch.STOP, stage + step)


def _chain(count):
  return [dispatch.Stage(dispatch.TOKENS, True)] + [dispatch.Stage(k - 1, True)
                                                     for k in range(1, count)]


@pytest.mark.parametrize("block_size", [None, 8])
def test_stage_cascade_stops_each_row_at_its_first_sure_stage_in_row_order(block_size):
  ids, lengths, types = _rows(37)
  runner = FakeStages()
  stage_flops = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [1e3, 2e3]])
  out, flops = dispatch.run_stage_buckets(
      runner, _chain(4), ids, types, lengths, length_buckets=(3, 6), batch_buckets=(1, 4, 8),
      num_classes=2, rule=ConfidentStops(0.85, 4), stage_flops=stage_flops,
      block_size=block_size)
  expected = np.array([0, 1, 3, 3] * 10)[:37]  # row % 4: sure at 0, at 1, at 3, never
  np.testing.assert_array_equal(out.final, expected)
  np.testing.assert_array_equal(out.ran, np.arange(4)[None] <= expected[:, None])  # in order
  np.testing.assert_allclose(out.probabilities[:, 0], np.array([0.95, 0.95, 0.95, 0.5] * 10)[:37])
  bucket = (lengths > 3).astype(int)
  cost = np.cumsum(stage_flops, axis=0)[expected, bucket]  # stages 0..final at its bucket
  np.testing.assert_allclose(flops, cost)
  for stage, _, hidden in runner.calls:  # each stage read the hidden states of the one before
    np.testing.assert_array_equal(hidden[:, 0, 0], ids[hidden[:, 1, 0].astype(int), 0] + stage - 1)
  ran_calls = [sum(c[1] for c in runner.calls if c[0] == k) for k in range(1, 4)]
  assert ran_calls[0] >= out.ran[:, 1].sum() and ran_calls[2] >= out.ran[:, 3].sum()


def test_stage_outputs_of_every_stage_are_kept_where_they_ran():
  ids, lengths, types = _rows(13)
  out = dispatch.run_stages(FakeStages(), _chain(4), ids, types, lengths, program_lengths=(6,),
                            batch_buckets=(1, 4), rule=ConfidentStops(0.85, 4))
  for k in range(4):
    kept = out.outputs[k][0][:, 0]
    expected = [FakeStages.CONFIDENCE[r % 4][k] for r in range(13)]
    np.testing.assert_allclose(kept[out.ran[:, k]], np.array(expected)[out.ran[:, k]])
    assert (kept[~out.ran[:, k]] == 0).all()


def test_stages_reading_one_earlier_stage_get_its_hidden_states():
  """A mean-pool exit at the prefix, then widths that both read the prefix (SHARCS with an exit):
  rows unsure at stage 0 jump to stage 2, the unsure there go on to stage 3, which reads stage 0
  too."""
  ids, lengths, types = _rows(21)
  stages = [dispatch.Stage(dispatch.TOKENS, True), dispatch.Stage(0, True),
            dispatch.Stage(0, True), dispatch.Stage(0, True)]
  runner = FakeStages()
  out = dispatch.run_stages(runner, stages, ids, types, lengths, program_lengths=(6,),
                            batch_buckets=(1, 4, 8), rule=ConfidentStops(0.85, 4, jump=2))
  np.testing.assert_array_equal(out.final, np.array([0, 2, 3, 3] * 6)[:21])
  assert not out.ran[:, 1].any()
  for _, _, hidden in runner.calls:  # the prefix's hidden states: ids
    np.testing.assert_array_equal(hidden[:, 0, 0], ids[hidden[:, 1, 0].astype(int), 0])


@dataclasses.dataclass(frozen=True)
class Sends:
  to: int
  stage_zero_answers: bool = True

  def continues(self, stage):
    return stage == 0

  def next_stages(self, stage, rows, outputs):
    return np.full(len(rows), self.to if stage == 0 else dispatch.STOP)


def test_a_rule_may_only_send_rows_on_to_later_stages_and_stop_where_a_stage_answers():
  ids, lengths, types = _rows(5)
  run = lambda stages, rule: dispatch.run_stages(FakeStages(), stages, ids, types, lengths,
                                                 program_lengths=(6,), batch_buckets=(1, 4),
                                                 rule=rule)
  with pytest.raises(ValueError, match="only a later stage"):
    run(_chain(3), Sends(to=0))
  with pytest.raises(ValueError, match="gives no probabilities"):
    run([dispatch.Stage(dispatch.TOKENS, False), dispatch.Stage(0, True)],
        Sends(to=dispatch.STOP))


@pytest.mark.parametrize("block_size", [None, 8])
def test_a_depth_and_width_cascade_on_fake_stages(block_size):
  """`routing.ExitCascade` with a narrow stage (1) after stage 0: the unsure at stage 0 try it,
  the unsure there go on at full width (stage 2, which reads stage 0's hidden states, not the
  narrow stage's), then stage 3. Rows end where the rule says, in row order, and pay for exactly
  the stages they ran; with the narrow stage skipped nobody runs it."""
  from sharcs_jax.serve.routing import ExitCascade

  ids, lengths, types = _rows(37)
  stages = [dispatch.Stage(dispatch.TOKENS, True), dispatch.Stage(0, True),
            dispatch.Stage(0, True), dispatch.Stage(2, True)]
  stage_flops = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [1e3, 2e3]])
  bucket = (lengths > 3).astype(int)
  for narrow, expected in ((0.85, [0, 1, 3, 3]), (None, [0, 2, 3, 3])):
    runner = FakeStages()
    rule = ExitCascade(0.85, 4, "max_prob", narrow_first=1, narrow_count=1,
                       narrow_threshold=narrow)
    out, flops = dispatch.run_stage_buckets(
        runner, stages, ids, types, lengths, length_buckets=(3, 6), batch_buckets=(1, 4, 8),
        num_classes=2, rule=rule, stage_flops=stage_flops, block_size=block_size)
    expected = np.array(expected * 10)[:37]  # by row % 4
    np.testing.assert_array_equal(out.final, expected)
    ran = np.zeros((37, 4), bool)
    ran[:, 0] = True
    ran[:, 1] = (expected != 0) & (narrow is not None)
    ran[:, 2] = expected >= 2
    ran[:, 3] = expected == 3
    np.testing.assert_array_equal(out.ran, ran)
    np.testing.assert_allclose(flops, (stage_flops[:, bucket].T * ran).sum(-1))
    for stage, _, hidden in runner.calls:  # stages 1 and 2 read stage 0, stage 3 read stage 2
      np.testing.assert_array_equal(hidden[:, 0, 0], ids[hidden[:, 1, 0].astype(int), 0]
                                    + (1 if stage == 3 else 0))
    c = np.array([[FakeStages.CONFIDENCE[r % 4][k] for r in range(37)] for k in range(4)])
    final, walked = rule.paths(np.stack([c, 1 - c], axis=-1))  # every stage's outputs known
    np.testing.assert_array_equal(final, expected)  # the offline walk agrees
    np.testing.assert_array_equal(walked, ran)
