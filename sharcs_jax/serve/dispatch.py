"""The one dispatch core: prefix once, each width's part on the inputs routed there, order kept.

For rows of one length bucket: the prefix (layers 1..K and the router) runs once per row in
batch buckets; a routing rule picks each row's first width from the router's logits; each width's
part then runs on the rows at that width, in increasing width order, and a rule that escalates
(the cascade) sends rows on to the next width from that width's probabilities, reusing the
prefix's hidden states. Rows run in blocks (bounding the hidden states held); a width's rows
that do not fill a batch wait for the next block, so that small remainder batches, which cost
several times more per row, run once per length bucket rather than once per block. `run_buckets`
takes rows of any length, one `run_rows` per length bucket. Every caller (the engine, dev
evaluation, the exported loader) calls it with a `Runner` for its programs; routing every row to
every width is the rule `EVERY_WIDTH`.

Imports only numpy (and the numpy-only padding and routing modules), so that the exported
loader, which has no flax, uses it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from sharcs_jax.data.padding import length_bucket_of, length_mask, pad_mask, pad_rows
from sharcs_jax.serve.routing import ran_flops

# Batch sizes programs are compiled for by default: a few sizes bound the compiles while small
# groups waste little padding.
BATCH_BUCKETS = (1, 8, 32)


def batch_sizes_for(runtime: str, batch_buckets: Sequence[int] = BATCH_BUCKETS
                    ) -> tuple[int, ...]:
  """The batch sizes groups run at. XLA's are the compiled buckets; ONNX Runtime's models take
  any batch, so there every group up to the largest bucket runs at its own size: no padded rows,
  one call per group (QQP, the 2x int8 cascade on chunks of 32 pairs: 560 against 444 pairs/s)."""
  if runtime == "xla":
    return tuple(batch_buckets)
  return tuple(range(1, max(batch_buckets) + 1))


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
  flops: np.ndarray | None = None  # float64 [n] what each row ran (`run_buckets` only)


@dataclasses.dataclass
class _PrefixBatch:
  start: int  # first row
  count: int  # real rows; the rest of `size` is padding
  size: int  # the batch bucket it ran at
  hidden: Any  # [size, S, d], as the runner returned it (on the device)
  mask: np.ndarray  # int32 [size, S], padding rows included
  on_host: np.ndarray | None = None  # `hidden` as a host array, once a row is gathered from it

  def host(self, to_host: Callable[[Any], np.ndarray]) -> np.ndarray:
    if self.on_host is None:
      self.on_host = to_host(self.hidden)
    return self.on_host


# Where a queued row's hidden states are: (its prefix batch, its position there) while that batch
# is held, or a host copy of the row once its block is done.
_Source = tuple[_PrefixBatch, int] | np.ndarray


class _Queue:
  """One width's rows waiting for a full batch, in ascending row order, with their sources."""

  def __init__(self):
    self.rows: list[int] = []
    self.sources: list[_Source] = []

  def add(self, rows: Sequence[int], sources: Sequence[_Source]) -> None:
    self.rows.extend(rows)
    self.sources.extend(sources)

  def take(self, batch_buckets: Sequence[int],
           flush: bool) -> list[tuple[np.ndarray, list[_Source], int]]:
    """(rows, sources, batch bucket) to run now: full batches of the largest bucket, and with
    `flush` the remainder split as `split_into_batches` does."""
    full = max(batch_buckets)
    cut = len(self.rows) if flush else len(self.rows) - len(self.rows) % full
    chunks = []
    for start, size in split_into_batches(cut, batch_buckets):
      stop = min(start + size, cut)
      chunks.append((np.asarray(self.rows[start:stop], np.int64), self.sources[start:stop], size))
    del self.rows[:cut], self.sources[:cut]
    return chunks

  def detach(self, to_host: Callable[[Any], np.ndarray]) -> None:
    """Copies the rows still waiting to the host, so that their prefix batches can be freed."""
    self.sources = [s if isinstance(s, np.ndarray) else np.array(s[0].host(to_host)[s[1]])
                    for s in self.sources]


def block_rows(batch_buckets: Sequence[int]) -> int:
  """Rows whose prefix hidden states are held at once: a few full batches per width while the
  hidden states stay small (about 20 MB at length 32 for MiniLM with batches of 32)."""
  return 16 * max(batch_buckets)


def run_buckets(runner: Runner, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, *,
                length_buckets: Sequence[int], batch_buckets: Sequence[int], num_widths: int,
                num_classes: int, rule: Routing, width_flops: np.ndarray,
                prefix_flops: np.ndarray, keep_every_width: bool = False,
                block_size: int | None = None,
                to_host: Callable[[Any], np.ndarray] = np.asarray) -> Dispatched:
  """Rows of any length, results in row order: each row runs in the shortest length bucket that
  holds its `lengths` [N] real tokens (`ids`, `types` [N, >= the longest bucket]), one `run_rows`
  per bucket. `width_flops` [m, length buckets]: one row's FLOPs at each width and bucket (prefix
  included), `prefix_flops` [length buckets] the prefix's; `flops` in the result counts each
  row's prefix once and the part of every width it ran (`routing.ran_flops`)."""
  n = len(lengths)
  probabilities = np.zeros((n, num_classes), np.float32)
  final = np.zeros(n, np.int64)
  ran = np.zeros((n, num_widths), bool)
  router = np.zeros((n, num_widths), np.float32)
  every = np.zeros((num_widths, n, num_classes), np.float32) if keep_every_width else None
  bucket_of = length_bucket_of(lengths, length_buckets)
  for bucket, length, rows in _by_length_bucket(bucket_of, length_buckets):
    out = run_rows(runner, ids[rows, :length], length_mask(lengths[rows], length),
                   types[rows, :length], length=length,
                   batch_buckets=batch_buckets, num_widths=num_widths, rule=rule,
                   width_flops=width_flops[:, bucket], keep_every_width=keep_every_width,
                   block_size=block_size, to_host=to_host)
    probabilities[rows], final[rows], ran[rows], router[rows] = (
        out.probabilities, out.final, out.ran, out.router)
    if every is not None:
      every[:, rows] = out.every_width
  flops = ran_flops(final, ran, np.asarray(width_flops)[:, bucket_of].T,
                    np.asarray(prefix_flops)[bucket_of])
  return Dispatched(probabilities, final, ran, router, every, flops)


def run_each_row(call: Callable[[int, int, np.ndarray, np.ndarray, np.ndarray], Any],
                 ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, *, columns: int,
                 length_buckets: Sequence[int], batch_buckets: Sequence[int],
                 to_host: Callable[[Any], np.ndarray] = np.asarray) -> np.ndarray:
  """One program over every row, without routing (the router's logits alone, the full-width
  baseline): `call(batch, length, ids, mask, types)` -> [batch, columns] runs in batch buckets
  per length bucket, padded as `run_rows` pads; float32 [N, columns] in row order."""
  out = np.zeros((len(lengths), columns), np.float32)
  for _, length, rows in _by_length_bucket(length_bucket_of(lengths, length_buckets),
                                           length_buckets):
    mask = length_mask(lengths[rows], length)
    for start, size in split_into_batches(len(rows), batch_buckets):
      batch = rows[start:start + size]
      out[batch] = to_host(call(size, length, pad_rows(ids[batch, :length], size),
                                pad_mask(mask[start:start + size], size),
                                pad_rows(types[batch, :length], size)))[:len(batch)]
  return out


def _by_length_bucket(bucket_of: np.ndarray, length_buckets: Sequence[int]):
  """(bucket, length, rows) for every length bucket that holds rows (`bucket_of` [N])."""
  for bucket, length in enumerate(length_buckets):
    rows = np.flatnonzero(bucket_of == bucket)
    if len(rows):
      yield bucket, length, rows


def run_rows(runner: Runner, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, *,
             length: int, batch_buckets: Sequence[int], num_widths: int, rule: Routing,
             width_flops: np.ndarray, keep_every_width: bool = False,
             block_size: int | None = None,
             to_host: Callable[[Any], np.ndarray] = np.asarray) -> Dispatched:
  """Routes rows [n, length] of one length bucket through prefix and parts (see module doc).

  Rows are taken in blocks of `block_size` (default `block_rows`): the prefix runs on a block,
  then each width's part on the rows routed or escalated there. Rows of a width that do not fill
  a batch of the largest bucket wait for the next block, so that only the last block runs
  remainders. `width_flops` [m]: FLOPs of one row at each width at this length (for cost-aware
  rules). A batch that is exactly one prefix batch takes that batch's hidden states as they lie
  on the device; others are gathered on the host. Without escalation every batch of a block is
  dispatched before any result is read, so host work overlaps compute.
  """
  n = len(ids)
  block_size = block_size or block_rows(batch_buckets)
  final = np.full(n, -1, np.int64)
  ran = np.zeros((n, num_widths), bool)
  router = np.zeros((n, num_widths), np.float32)
  probabilities = every = None
  queues = [_Queue() for _ in range(num_widths)]
  for start in range(0, n, block_size):
    stop = min(n, start + block_size)
    batches, router[start:stop] = _prefix(runner, ids[start:stop], mask[start:stop],
                                          types[start:stop], length, batch_buckets, to_host)
    first = np.asarray(rule.first_widths(router[start:stop],
                                         np.broadcast_to(width_flops, (stop - start, num_widths))))
    for b in batches:
      for i in range(num_widths):
        at = np.flatnonzero(first[b.start:b.start + b.count] == i)
        queues[i].add((start + b.start + at).tolist(), [(b, int(p)) for p in at])
    pending = []  # (width, rows, sources, device probabilities)
    for i in range(num_widths):
      for rows, sources, size in queues[i].take(batch_buckets, flush=stop == n):
        hidden, batch_mask = _inputs(sources, mask[rows], size, to_host)
        pending.append((i, rows, sources, runner.part(i, size, length, hidden, batch_mask)))
        ran[rows, i] = True
      if not rule.escalating and i < num_widths - 1:
        continue  # read once every width is dispatched
      for width, rows, sources, probs in pending:
        probs = to_host(probs)[:len(rows)]
        if probabilities is None:  # the class count is known from the first result
          probabilities = np.zeros((n, probs.shape[-1]), np.float32)
          if keep_every_width:
            every = np.zeros((num_widths,) + probabilities.shape, np.float32)
        probabilities[rows] = probs
        if every is not None:
          every[width, rows] = probs
        go_on = (rule.escalates(probs, width) if rule.escalating and width < num_widths - 1
                 else np.zeros(len(rows), bool))
        final[rows[~go_on]] = width
        if go_on.any():
          queues[width + 1].add(rows[go_on].tolist(), [sources[j] for j in np.flatnonzero(go_on)])
      pending = []
    for queue in queues:
      queue.detach(to_host)
  if probabilities is None:
    probabilities = np.zeros((n, 0), np.float32)
    every = np.zeros((num_widths, n, 0), np.float32) if keep_every_width else None
  return Dispatched(probabilities, final, ran, router, every)


def _inputs(sources: Sequence[_Source], mask: np.ndarray, size: int,
            to_host: Callable[[Any], np.ndarray]) -> tuple[Any, np.ndarray]:
  """A part's (hidden states, mask) for these rows padded to `size`: a whole prefix batch as it
  lies on the device, else the rows gathered on the host."""
  head = sources[0]
  if not isinstance(head, np.ndarray):
    batch = head[0]
    if (batch.size == size and batch.count == len(sources) and all(
        not isinstance(s, np.ndarray) and s[0] is batch and s[1] == p
        for p, s in enumerate(sources))):
      return batch.hidden, batch.mask
  rows = np.stack([s if isinstance(s, np.ndarray) else s[0].host(to_host)[s[1]] for s in sources])
  return pad_rows(rows, size), pad_mask(mask, size)


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
