"""The one dispatch core: prefix once, each width's part on the inputs routed there, order kept.

Rows are taken in ascending length (`run_buckets` sorts them and gives results back in row
order) and cut into contiguous batches by `plan_batches`: each batch runs at the smallest batch
size and program length that hold it, and the cut minimises the modelled time (a fixed cost per
call plus batch x length tokens), so that a long row does not pad a batch of short ones and a
few rows of several lengths still run as one call. The prefix (layers 1..K and the router) runs
once per row; a routing rule picks each row's first width from the router's logits; each width's
part then runs on the rows at that width, in increasing width order, and a rule that escalates
(the cascade) sends rows on to the next width from that width's probabilities, reusing the
prefix's hidden states. Rows run in blocks (bounding the hidden states held); a width's rows
that do not fill a batch wait for the next block, so that small remainder batches, which cost
several times more per row, run once rather than once per block. Every caller (the engine, dev
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

# What one program call costs beyond its rows, in tokens of work: ONNX Runtime int8 on 2 cores
# (Intel Xeon, AMX) takes 0.45 + 0.0097 ms per token for the QQP prefix, 0.74 + 0.0177 for the
# full-width part and 0.31 + 0.0047 for the 0.25 part (batches 1 to 32 at length 32): 45 to 65.
CALL_COST_TOKENS = 48


def batch_sizes_for(runtime: str, batch_buckets: Sequence[int] = BATCH_BUCKETS
                    ) -> tuple[int, ...]:
  """The batch sizes groups run at. XLA's are the compiled buckets; ONNX Runtime's models take
  any batch, so there every group up to the largest bucket runs at its own size: no padded rows,
  one call per group (QQP, the 2x int8 cascade on chunks of 32 pairs: 560 against 444 pairs/s)."""
  if runtime == "xla":
    return tuple(batch_buckets)
  return tuple(range(1, max(batch_buckets) + 1))


def lengths_for(runtime: str, length_buckets: Sequence[int]) -> tuple[int, ...]:
  """The lengths programs run at: XLA's compiled length buckets; ONNX Runtime's models take any
  length up to the longest bucket, so there a batch runs at its longest row's length."""
  if runtime == "xla":
    return tuple(length_buckets)
  return tuple(range(1, max(length_buckets) + 1))


@dataclasses.dataclass(frozen=True)
class Batch:
  start: int  # first row
  stop: int  # one past the last row
  size: int  # the batch size it runs at (padding rows beyond stop - start)
  length: int  # the program length it runs at

  @property
  def count(self) -> int:
    """Real rows (the rest of `size` is padding)."""
    return self.stop - self.start


def plan_batches(lengths: np.ndarray, batch_sizes: Sequence[int],
                 program_lengths: Sequence[int]) -> list[Batch]:
  """Contiguous batches over rows of these real `lengths` (best ascending), each at the smallest
  of `batch_sizes` and `program_lengths` that hold it, cut where the modelled time
  (`CALL_COST_TOKENS` per call + size x length) is least: an exact dynamic programme."""
  lengths = np.asarray(lengths)
  n = len(lengths)
  sizes, programs = np.sort(np.asarray(batch_sizes)), np.sort(np.asarray(program_lengths))
  if n and lengths.max() > programs[-1]:
    raise ValueError(f"a row of {lengths.max()} tokens is longer than the longest program "
                     f"length {programs[-1]}")
  largest = int(sizes[-1])
  size_of = sizes[np.searchsorted(sizes, np.arange(1, largest + 1))]  # [k - 1]: holds k rows
  length_of = programs[np.searchsorted(programs, lengths)]  # each row's own program length
  best, cut = np.zeros(n + 1), np.zeros(n + 1, np.int64)
  for stop in range(1, n + 1):
    k = min(largest, stop)
    # Batches (stop - j - 1, stop) for j < k: their program length, then their cost.
    longest = np.maximum.accumulate(length_of[stop - 1::-1][:k])
    cost = best[stop - 1::-1][:k] + CALL_COST_TOKENS + size_of[:k] * longest
    j = int(np.argmin(cost))
    best[stop], cut[stop] = cost[j], stop - j - 1
  batches, stop = [], n
  while stop:
    start = int(cut[stop])
    batches.append(Batch(start, stop, int(size_of[stop - start - 1]),
                         int(length_of[start:stop].max())))
    stop = start
  return batches[::-1]


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
  batch: Batch  # its rows (of the block), batch size and length
  hidden: Any  # [size, length, d], as the runner returned it (on the device)
  mask: np.ndarray  # int32 [size, length], padding rows included
  on_host: np.ndarray | None = None  # `hidden` as a host array, once a row is gathered from it

  def host(self, to_host: Callable[[Any], np.ndarray]) -> np.ndarray:
    if self.on_host is None:
      self.on_host = to_host(self.hidden)
    return self.on_host


# Where a queued row's hidden states are: (its prefix batch, its position there) while that batch
# is held, or a host copy of the row once its block is done.
_Source = tuple[_PrefixBatch, int] | np.ndarray


class _Queue:
  """One width's rows waiting for a full batch, with their sources; taken in ascending row order."""

  def __init__(self):
    self.rows: list[int] = []
    self.sources: list[_Source] = []

  def add(self, rows: Sequence[int], sources: Sequence[_Source]) -> None:
    self.rows.extend(rows)
    self.sources.extend(sources)

  def take(self, lengths: np.ndarray, batch_sizes: Sequence[int],
           program_lengths: Sequence[int], flush: bool
           ) -> list[tuple[np.ndarray, list[_Source], Batch]]:
    """(rows, sources, batch) to run now: rows that fill batches of the largest size, and with
    `flush` every row, cut by `plan_batches` (`lengths` [n] of every row)."""
    order = np.argsort(self.rows, kind="stable")  # escalated rows join the rows routed here
    self.rows = [self.rows[i] for i in order]
    self.sources = [self.sources[i] for i in order]
    full = max(batch_sizes)
    cut = len(self.rows) if flush else len(self.rows) - len(self.rows) % full
    rows = np.asarray(self.rows[:cut], np.int64)
    chunks = [(rows[b.start:b.stop], self.sources[b.start:b.stop], b)
              for b in plan_batches(lengths[rows], batch_sizes, program_lengths)]
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
                prefix_flops: np.ndarray, program_lengths: Sequence[int] | None = None,
                keep_every_width: bool = False, block_size: int | None = None,
                to_host: Callable[[Any], np.ndarray] = np.asarray) -> Dispatched:
  """Rows of any length (`lengths` [N] real tokens of `ids`, `types` [N, >= the longest program
  length]) through `run_rows` in ascending length, results in row order. Programs run at
  `program_lengths` (default the length buckets). `width_flops` [m, length buckets]: one row's
  FLOPs at each width and bucket (prefix included), `prefix_flops` [length buckets] the
  prefix's; each row is costed at its own length bucket, and `flops` in the result counts its
  prefix once and the part of every width it ran (`routing.ran_flops`)."""
  lengths = np.asarray(lengths)
  n = len(lengths)
  bucket_of = length_bucket_of(lengths, length_buckets)
  row_flops = np.asarray(width_flops, np.float64)[:, bucket_of].T  # [N, m]
  order = np.argsort(lengths, kind="stable")
  out = run_rows(runner, ids[order], types[order], lengths[order],
                 program_lengths=tuple(program_lengths or length_buckets),
                 batch_buckets=batch_buckets, num_widths=num_widths, rule=rule,
                 width_flops=row_flops[order], keep_every_width=keep_every_width,
                 block_size=block_size, to_host=to_host)
  back = np.empty(n, np.int64)
  back[order] = np.arange(n)
  probabilities = (out.probabilities[back] if n else np.zeros((0, num_classes), np.float32))
  every = None
  if keep_every_width:
    every = (out.every_width[:, back] if n
             else np.zeros((num_widths, 0, num_classes), np.float32))
  final, ran = out.final[back], out.ran[back]
  flops = ran_flops(final, ran, row_flops, np.asarray(prefix_flops)[bucket_of])
  return Dispatched(probabilities, final, ran, out.router[back], every, flops)


def run_each_row(call: Callable[[int, int, np.ndarray, np.ndarray, np.ndarray], Any],
                 ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, *, columns: int,
                 program_lengths: Sequence[int], batch_buckets: Sequence[int],
                 to_host: Callable[[Any], np.ndarray] = np.asarray) -> np.ndarray:
  """One program over every row, without routing (the router's logits alone, the full-width
  baseline): `call(batch, length, ids, mask, types)` -> [batch, columns] runs on batches cut as
  `run_buckets` cuts them (rows in ascending length); float32 [N, columns] in row order."""
  lengths = np.asarray(lengths)
  out = np.zeros((len(lengths), columns), np.float32)
  order = np.argsort(lengths, kind="stable")
  for b in plan_batches(lengths[order], batch_buckets, program_lengths):
    rows = order[b.start:b.stop]
    out[rows] = to_host(call(b.size, b.length,
                             *_padded_inputs(ids, types, lengths, rows, b)))[:len(rows)]
  return out


def run_rows(runner: Runner, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, *,
             program_lengths: Sequence[int], batch_buckets: Sequence[int], num_widths: int,
             rule: Routing, width_flops: np.ndarray, keep_every_width: bool = False,
             block_size: int | None = None,
             to_host: Callable[[Any], np.ndarray] = np.asarray) -> Dispatched:
  """Routes rows (`ids`, `types` [n, >= the longest program length needed], `lengths` [n] real
  tokens, best ascending) through prefix and parts (see module doc).

  Rows are taken in blocks of `block_size` (default `block_rows`): the prefix runs on a block,
  then each width's part on the rows routed or escalated there. Rows of a width that do not fill
  a batch of the largest size wait for the next block, so that only the last block runs
  remainders. `width_flops` [n, m] or [m]: FLOPs of each row at each width (for cost-aware
  rules). A batch that is exactly one prefix batch takes that batch's hidden states as they lie
  on the device; others are gathered on the host. Without escalation every batch of a block is
  dispatched before any result is read, so host work overlaps compute.
  """
  n = len(ids)
  lengths = np.asarray(lengths)
  width_flops = np.broadcast_to(np.asarray(width_flops, np.float64), (n, num_widths))
  block_size = block_size or block_rows(batch_buckets)
  final = np.full(n, -1, np.int64)
  ran = np.zeros((n, num_widths), bool)
  router = np.zeros((n, num_widths), np.float32)
  probabilities = every = None
  queues = [_Queue() for _ in range(num_widths)]
  for start in range(0, n, block_size):
    stop = min(n, start + block_size)
    batches, router[start:stop] = _prefix(runner, ids[start:stop], types[start:stop],
                                          lengths[start:stop], batch_buckets, program_lengths,
                                          to_host)
    first = np.asarray(rule.first_widths(router[start:stop], width_flops[start:stop]))
    for b in batches:
      for i in range(num_widths):
        at = np.flatnonzero(first[b.batch.start:b.batch.stop] == i)
        queues[i].add((start + b.batch.start + at).tolist(), [(b, int(p)) for p in at])
    pending = []  # (width, rows, sources, device probabilities)
    for i in range(num_widths):
      for rows, sources, batch in queues[i].take(lengths, batch_buckets, program_lengths,
                                                 flush=stop == n):
        hidden, batch_mask = _inputs(sources, lengths[rows], batch, to_host)
        pending.append((i, rows, sources,
                        runner.part(i, batch.size, batch.length, hidden, batch_mask)))
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


def _fit_length(hidden: np.ndarray, length: int) -> np.ndarray:
  """One row's hidden states [L, d] cut or zero-padded to `length` positions: past its real
  tokens a row's positions are masked, so either is exact."""
  if len(hidden) >= length:
    return hidden[:length]
  return np.concatenate([hidden, np.zeros((length - len(hidden),) + hidden.shape[1:],
                                          hidden.dtype)])


def _inputs(sources: Sequence[_Source], lengths: np.ndarray, batch: Batch,
            to_host: Callable[[Any], np.ndarray]) -> tuple[Any, np.ndarray]:
  """A part's (hidden states, mask) for these rows (`lengths` real tokens) as `batch` runs them:
  a whole prefix batch as it lies on the device, else the rows gathered on the host."""
  head = sources[0]
  if not isinstance(head, np.ndarray):
    held = head[0]
    if (held.batch.size == batch.size and held.batch.length == batch.length
        and held.batch.count == len(sources) and all(
            not isinstance(s, np.ndarray) and s[0] is held and s[1] == p
            for p, s in enumerate(sources))):
      return held.hidden, held.mask
  rows = np.stack([_fit_length(s if isinstance(s, np.ndarray) else s[0].host(to_host)[s[1]],
                               batch.length) for s in sources])
  return pad_rows(rows, batch.size), pad_mask(length_mask(lengths, batch.length), batch.size)


def _padded_inputs(ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, rows: Any,
                   batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, mask, types) of these rows cut to the batch's length and padded to its size."""
  return (pad_rows(ids[rows, :batch.length], batch.size),
          pad_mask(length_mask(lengths[rows], batch.length), batch.size),
          pad_rows(types[rows, :batch.length], batch.size))


def _prefix(runner: Runner, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray,
            batch_sizes: Sequence[int], program_lengths: Sequence[int],
            to_host: Callable[[Any], np.ndarray]) -> tuple[list[_PrefixBatch], np.ndarray]:
  """The prefix over every row in the batches `plan_batches` cuts: the batches as run, router
  logits [n, m]."""
  batches, pending = [], []
  for b in plan_batches(lengths, batch_sizes, program_lengths):
    batch_ids, batch_mask, batch_types = _padded_inputs(ids, types, lengths,
                                                       slice(b.start, b.stop), b)
    hidden, router = runner.prefix(b.size, b.length, batch_ids, batch_mask, batch_types)
    batches.append(_PrefixBatch(b, hidden, batch_mask))
    pending.append(router)
  router = np.concatenate([to_host(r)[:b.batch.count] for r, b in zip(pending, batches)])
  return batches, router
