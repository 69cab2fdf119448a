"""The one dispatch core: prefix once, each width's part on the inputs routed there, order kept.

For rows of one length bucket: the prefix (layers 1..K and the router) runs once per row in
batch buckets; a routing rule picks each row's first width from the router's logits; each width's
part then runs on the rows at that width, in increasing width order, and a rule that escalates
(the cascade) sends rows on to the next width from that width's probabilities, reusing the
prefix's hidden states. Every caller (the engine, dev evaluation, the exported loader) supplies a
`Runner` for its programs; routing every row to every width is the rule `EVERY_WIDTH`.

Imports only numpy, so that the exported loader, which has no flax, uses it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

# Batch sizes programs are compiled for by default: a few sizes bound the compiles while small
# groups waste little padding.
BATCH_BUCKETS = (1, 8, 32)


def split_into_batches(count: int, batch_buckets: Sequence[int]) -> list[tuple[int, int]]:
  """(start, batch bucket) covering `count` rows with little padding and few calls.

  Full batches of the largest bucket first; a remainder goes into the smallest bucket that holds
  it when that at most doubles its rows, else it is split into the largest bucket that fits.
  """
  out, start = [], 0
  while start < count:
    left = count - start
    fits = [b for b in batch_buckets if b >= left]
    smaller = [b for b in batch_buckets if b <= left]
    size = fits[0] if fits and (fits[0] <= 2 * left or not smaller) else max(smaller)
    out.append((start, size))
    start += min(size, left)
  return out


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """`x` with zero rows appended up to `size` rows."""
  x = np.asarray(x)
  if len(x) == size:
    return x
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def pad_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Attention masks padded to `size` rows; padding rows attend to one token, so that no softmax
  is empty (an empty one is NaN, which padding rows must not produce even unread)."""
  padded = pad_rows(mask, size).copy()
  padded[len(mask):, 0] = 1
  return padded


class Runner(Protocol):
  """One caller's programs: the prefix, and one width's part (head included)."""

  def prefix(self, batch: int, length: int, ids: np.ndarray, mask: np.ndarray,
             types: np.ndarray) -> tuple[Any, Any]:
    """(hidden states [batch, length, d], router logits [batch, m]); arrays may stay on device."""

  def part(self, width_index: int, batch: int, length: int, hidden: Any, mask: Any) -> Any:
    """Class probabilities [batch, C]."""


class Routing(Protocol):
  """What dispatch asks of a routing rule (`routing.Rule`, `routing.Cascade`)."""

  escalating: bool

  def first_widths(self, router_logits: np.ndarray, example_flops: np.ndarray) -> np.ndarray: ...

  def escalates(self, probabilities: np.ndarray, width_index: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class _EveryWidth:
  """Every row runs every width, from the narrowest: what dev evaluation measures."""

  escalating = True

  def first_widths(self, router_logits: np.ndarray, example_flops: np.ndarray) -> np.ndarray:
    return np.zeros(len(router_logits), np.int64)

  def escalates(self, probabilities: np.ndarray, width_index: int) -> np.ndarray:
    return np.ones(len(probabilities), bool)


EVERY_WIDTH = _EveryWidth()


@dataclasses.dataclass(frozen=True)
class Dispatched:
  probabilities: np.ndarray  # float32 [n, C] at the width each row ended at
  final: np.ndarray  # int64 [n] index of that width
  ran: np.ndarray  # bool [n, m] widths whose part ran for the row
  router: np.ndarray  # float32 [n, m]
  every_width: np.ndarray | None  # float32 [m, n, C] each width's probabilities (0 if not run)


@dataclasses.dataclass(frozen=True)
class _PrefixBatch:
  start: int  # first row
  count: int  # real rows; the rest of `size` is padding
  size: int  # the batch bucket it ran at
  hidden: Any  # [size, S, d], as the runner returned it (on the device)
  mask: np.ndarray  # int32 [size, S], padding rows included


def run_rows(runner: Runner, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, *,
             length: int, batch_buckets: Sequence[int], num_widths: int, rule: Routing,
             width_flops: np.ndarray, keep_every_width: bool = False,
             to_host: Callable[[Any], np.ndarray] = np.asarray) -> Dispatched:
  """Routes rows [n, length] of one length bucket through prefix and parts (see module doc).

  `width_flops` [m]: FLOPs of one row at each width at this length (for cost-aware rules).
  A group that is exactly one prefix batch (every row of a request routed alike) takes that
  batch's hidden states as they lie on the device; others are gathered on the host. Without
  escalation every group is dispatched before any result is read, so host work overlaps compute.
  """
  n = len(ids)
  if not n:
    return Dispatched(np.zeros((0, 0), np.float32), np.zeros(0, np.int64),
                      np.zeros((0, num_widths), bool), np.zeros((0, num_widths), np.float32),
                      np.zeros((num_widths, 0, 0), np.float32) if keep_every_width else None)
  batches, router = _prefix(runner, ids, mask, types, length, batch_buckets, to_host)
  whole = {(b.start, b.count, b.size): b for b in batches}
  host_hidden = None
  current = np.asarray(rule.first_widths(router, np.broadcast_to(width_flops, router.shape)),
                       np.int64)
  final = np.full(n, -1, np.int64)
  ran = np.zeros((n, num_widths), bool)
  probabilities = every = None
  pending = []  # (width, rows, device probabilities)
  for i in range(num_widths):
    group = np.flatnonzero((current == i) & (final < 0))  # ascending row numbers
    for start, size in split_into_batches(len(group), batch_buckets):
      part = group[start:start + size]
      batch = whole.get((int(part[0]), len(part), size))
      if batch is not None and part[-1] - part[0] == len(part) - 1:
        inputs = (batch.hidden, batch.mask)
      else:
        if host_hidden is None:
          host_hidden = np.concatenate([to_host(b.hidden)[:b.count] for b in batches])
        inputs = (pad_rows(host_hidden[part], size), pad_mask(mask[part], size))
      pending.append((i, part, runner.part(i, size, length, *inputs)))
    ran[group, i] = True
    if not rule.escalating and i < num_widths - 1:
      final[group] = i
      continue
    for width, part, probs in pending:  # an escalating rule needs this width's results now
      probs = to_host(probs)[:len(part)]
      if probabilities is None:  # the class count is known from the first result
        probabilities = np.zeros((n, probs.shape[-1]), np.float32)
        if keep_every_width:
          every = np.zeros((num_widths,) + probabilities.shape, np.float32)
      probabilities[part] = probs
      if every is not None:
        every[width, part] = probs
      go_on = (rule.escalates(probs, width) if width < num_widths - 1
               else np.zeros(len(part), bool))
      final[part[~go_on]] = width
      current[part[go_on]] = width + 1
    pending = []
  return Dispatched(probabilities, final, ran, router, every)


def _prefix(runner: Runner, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, length: int,
            batch_buckets: Sequence[int], to_host: Callable[[Any], np.ndarray]
            ) -> tuple[list[_PrefixBatch], np.ndarray]:
  """The prefix over every row in batch buckets: the batches as run, router logits [n, m]."""
  batches, pending = [], []
  for start, size in split_into_batches(len(ids), batch_buckets):
    rows = slice(start, start + size)
    count = len(ids[rows])
    batch_mask = pad_mask(mask[rows], size)
    hidden, router = runner.prefix(size, length, pad_rows(ids[rows], size), batch_mask,
                                   pad_rows(types[rows], size))
    batches.append(_PrefixBatch(start, count, size, hidden, batch_mask))
    pending.append(router)
  router = np.concatenate([to_host(r)[:b.count] for r, b in zip(pending, batches)])
  return batches, router
