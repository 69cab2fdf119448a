"""The one dispatch core: a cascade of stages over rows, each row running only what it needs.

A stage is a precompiled program that reads the token ids or the hidden states an earlier stage
returned, and returns hidden states and outputs (class probabilities, router logits); a rule
sends each row on to a later stage or stops it there (`run_stages`). SHARCS is one such cascade
(`run_rows`): the prefix (layers 1..K and the router) runs once per row, the router's rule picks
each row's first width, each width's part runs on the rows at that width, reading the prefix's
hidden states, and a rule that escalates (the cascade) sends rows on to the next width from that
width's probabilities. An early-exit model is another: layers 1..k with an exit, then k+1..l
reading them, and so on.

Rows are taken in ascending length (`run_buckets` / `run_stage_buckets` sort them and give
results back in row order) and cut into contiguous batches by `plan_batches`: each batch runs
at the smallest batch size and program length that hold it, and the cut minimises the modelled
time (a fixed cost per call plus batch x length tokens), so that a long row does not pad a batch
of short ones and a few rows of several lengths still run as one call. Rows run in blocks
(bounding the hidden states held); a stage's rows that do not fill a batch wait for the next
block, so that small remainder batches, which cost several times more per row, run once rather
than once per block. Every caller (the engine, dev evaluation, the exported loader) calls it
with a runner for its programs; routing every row to every width is the rule `EVERY_WIDTH`.

Imports only numpy (and the numpy-only padding and routing modules), so that the exported
loader, which has no flax, uses it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from sharcs_jax.data.padding import length_bucket_of, length_mask, pad_mask, pad_rows
from sharcs_jax.serve.routing import STOP, WidthStages, ran_flops, width_ran_flops

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


@dataclasses.dataclass(frozen=True)
class Stage:
  """One precompiled program of a cascade: it reads the token ids (`reads == TOKENS`) or the
  hidden states an earlier stage returned, and returns hidden states and outputs; a row may stop
  after it only if it `answers` (its first output is class probabilities)."""

  reads: int
  answers: bool


TOKENS = -1  # `Stage.reads` of a stage that reads the token ids


def chained_stages(count: int) -> list[Stage]:
  """`count` stages, each answering, the first reading the token ids and each next one the
  hidden states of the one before: an early-exit model's cascade."""
  return [Stage(TOKENS, answers=True)] + [Stage(j - 1, answers=True) for j in range(1, count)]


class StageRunner(Protocol):
  """One caller's stage programs."""

  def stage(self, index: int, batch: int, length: int, inputs: tuple[Any, ...]
            ) -> tuple[Any, tuple[Any, ...]]:
    """(hidden states [batch, length, d] or None, outputs: arrays [batch, k]) of stage `index`
    on `inputs`: (ids, mask, types) for a stage that reads tokens, else (hidden, mask). Arrays
    may stay on the device."""


class StageRule(Protocol):
  """Which stage each row goes on to."""

  def continues(self, stage: int) -> bool:
    """Whether any row may go on from `stage` (if not, its results are read last)."""

  def next_stages(self, stage: int, rows: np.ndarray, outputs: tuple[np.ndarray, ...]
                  ) -> np.ndarray:
    """int64 [len(rows)]: the later stage each row runs next, or STOP, from `stage`'s
    host `outputs` for those rows."""


@dataclasses.dataclass(frozen=True)
class StagesRun:
  probabilities: np.ndarray  # float32 [n, C] from the stage each row stopped at
  final: np.ndarray  # int64 [n] that stage
  ran: np.ndarray  # bool [n, S] stages that ran for the row
  outputs: tuple[tuple[np.ndarray, ...], ...]  # per stage, its outputs [n, k] (0 where not run)


@dataclasses.dataclass
class _HeldBatch:
  """A stage's batch as it ran, kept while later stages may read its hidden states."""

  size: int
  length: int
  count: int  # real rows
  hidden: Any  # [size, length, d], as the runner returned it (on the device)
  mask: np.ndarray  # int32 [size, length], padding rows included
  on_host: np.ndarray | None = None  # `hidden` as a host array, once a row is gathered from it

  def host(self, to_host: Callable[[Any], np.ndarray]) -> np.ndarray:
    if self.on_host is None:
      self.on_host = to_host(self.hidden)
    return self.on_host


# Where a row's hidden states from one stage are: (the stage's batch, its position there) while
# that batch is held, or a host copy of the row once its block is done.
_Source = tuple[_HeldBatch, int] | np.ndarray


class _Queue:
  """One stage's rows waiting for a full batch; taken in ascending row order."""

  def __init__(self):
    self.rows: list[int] = []

  def take(self, lengths: np.ndarray, batch_sizes: Sequence[int],
           program_lengths: Sequence[int], flush: bool) -> list[tuple[np.ndarray, Batch]]:
    """(rows, batch) to run now: rows that fill batches of the largest size, and with `flush`
    every row, cut by `plan_batches` (`lengths` [n] of every row)."""
    self.rows.sort()  # rows that went on from an earlier stage join those routed here
    full = max(batch_sizes)
    cut = len(self.rows) if flush else len(self.rows) - len(self.rows) % full
    rows = np.asarray(self.rows[:cut], np.int64)
    del self.rows[:cut]
    return [(rows[b.start:b.stop], b)
            for b in plan_batches(lengths[rows], batch_sizes, program_lengths)]


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
  prefix once and the part of every width it ran (`routing.width_ran_flops`)."""
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
  flops = width_ran_flops(ran, row_flops, np.asarray(prefix_flops)[bucket_of])
  return Dispatched(probabilities, final, ran, out.router[back], every, flops)


def run_stage_buckets(runner: StageRunner, stages: Sequence[Stage], ids: np.ndarray,
                      types: np.ndarray, lengths: np.ndarray, *, length_buckets: Sequence[int],
                      batch_buckets: Sequence[int], num_classes: int, rule: StageRule,
                      stage_flops: np.ndarray, program_lengths: Sequence[int] | None = None,
                      block_size: int | None = None,
                      to_host: Callable[[Any], np.ndarray] = np.asarray
                      ) -> tuple[StagesRun, np.ndarray]:
  """Rows of any length through `run_stages` in ascending length, results in row order (the
  rule is asked about rows by their numbers here, not their place in that order), and FLOPs
  per row [N]: `stage_flops` [S, length buckets] (one row's cost of each stage alone, at each
  bucket) summed over the stages the row ran, at its own bucket."""
  lengths = np.asarray(lengths)
  n = len(lengths)
  order = np.argsort(lengths, kind="stable")
  out = run_stages(runner, stages, ids[order], types[order], lengths[order],
                   program_lengths=tuple(program_lengths or length_buckets),
                   batch_buckets=batch_buckets, rule=_RowsByNumber(rule, order),
                   block_size=block_size, to_host=to_host)
  back = np.empty(n, np.int64)
  back[order] = np.arange(n)
  probabilities = (out.probabilities[back] if n else np.zeros((0, num_classes), np.float32))
  ran = out.ran[back]
  flops = ran_flops(ran, np.asarray(stage_flops, np.float64)[:, length_bucket_of(
      lengths, length_buckets)].T)
  return StagesRun(probabilities, out.final[back], ran,
                   tuple(tuple(o[back] for o in outs) for outs in out.outputs)), flops


@dataclasses.dataclass(frozen=True)
class _RowsByNumber:
  """A rule asked about rows by their place in `order` answers for rows `order[place]`."""

  rule: StageRule
  order: np.ndarray

  def continues(self, stage: int) -> bool:
    return self.rule.continues(stage)

  def next_stages(self, stage: int, rows: np.ndarray, outputs: tuple[np.ndarray, ...]
                  ) -> np.ndarray:
    return self.rule.next_stages(stage, self.order[rows], outputs)


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
  tokens, best ascending) through prefix and parts: SHARCS as `run_stages` cascades it, stage 0
  the prefix (its output the router's logits) and stage 1 + i width i's part, which reads the
  prefix. `width_flops` [n, m] or [m]: FLOPs of each row at each width (for cost-aware rules).
  """
  n = len(ids)
  width_flops = np.broadcast_to(np.asarray(width_flops, np.float64), (n, num_widths))
  stages = [Stage(TOKENS, answers=False)] + [Stage(0, answers=True)] * num_widths
  out = run_stages(WidthParts(runner), stages, ids, types, lengths,
                   program_lengths=program_lengths, batch_buckets=batch_buckets,
                   rule=WidthStages(rule, num_widths, width_flops), block_size=block_size,
                   to_host=to_host)
  router = out.outputs[0][0] if n else np.zeros((0, num_widths), np.float32)
  every = None
  if keep_every_width:
    every = np.stack([outputs[0] for outputs in out.outputs[1:]])
  return Dispatched(out.probabilities, out.final - 1, out.ran[:, 1:], router, every)


@dataclasses.dataclass(frozen=True)
class WidthParts:
  """A SHARCS `Runner` as stages: the prefix, then each width's part."""

  runner: Runner

  def stage(self, index: int, batch: int, length: int, inputs: tuple[Any, ...]
            ) -> tuple[Any, tuple[Any, ...]]:
    if index == 0:
      hidden, router = self.runner.prefix(batch, length, *inputs)
      return hidden, (router,)
    return None, (self.runner.part(index - 1, batch, length, *inputs),)


def run_stages(runner: StageRunner, stages: Sequence[Stage], ids: np.ndarray, types: np.ndarray,
               lengths: np.ndarray, *, program_lengths: Sequence[int],
               batch_buckets: Sequence[int], rule: StageRule, block_size: int | None = None,
               to_host: Callable[[Any], np.ndarray] = np.asarray) -> StagesRun:
  """Rows (`ids`, `types` [n, >= the longest program length needed], `lengths` [n] real tokens,
  best ascending) through a cascade of stages, each row entering at stage 0 (which reads the
  token ids) and going on where `rule` sends it, to a later stage.

  Rows are taken in blocks of `block_size` (default `block_rows`), and a block's stages run in
  index order, each on every row sent to it. A stage reading tokens runs on all its rows;
  another holds rows that do not fill a batch of the largest size for the next block, so that
  only the last block runs remainders. A batch that is exactly one batch of the stage it reads
  takes that batch's hidden states as they lie on the device; others are gathered on the host.
  A stage no row goes on from is read after the block's last stage is dispatched, so host work
  overlaps compute.
  """
  n, count = len(ids), len(stages)
  lengths = np.asarray(lengths)
  read_by_later = {stage.reads for stage in stages}
  block_size = block_size or block_rows(batch_buckets)
  final = np.full(n, STOP, np.int64)
  ran = np.zeros((n, count), bool)
  outputs: list[list[np.ndarray] | None] = [None] * count
  probabilities = None
  queues = [_Queue() for _ in range(count)]
  sources: dict[int, dict[int, _Source]] = {}  # unfinished row -> stage -> its hidden states
  for start in range(0, n, block_size):
    stop = min(n, start + block_size)
    queues[0].rows.extend(range(start, stop))
    unread = []  # (stage, rows, held batch, device outputs)
    for s, stage in enumerate(stages):
      for rows, batch in queues[s].take(lengths, batch_sizes=batch_buckets,
                                        program_lengths=program_lengths,
                                        flush=stop == n or stage.reads == TOKENS):
        if stage.reads == TOKENS:
          inputs = _padded_inputs(ids, types, lengths, rows, batch)
        else:
          inputs = _inputs([sources[r][stage.reads] for r in rows], lengths[rows], batch, to_host)
        hidden, outs = runner.stage(s, batch.size, batch.length, inputs)
        held = (_HeldBatch(batch.size, batch.length, batch.count, hidden, inputs[1])
                if s in read_by_later else None)
        unread.append((s, rows, held, outs))
        ran[rows, s] = True
      if rule.continues(s) or s == count - 1:
        for done_stage, rows, held, outs in unread:
          outs = tuple(to_host(o)[:len(rows)] for o in outs)
          if outputs[done_stage] is None:  # the widths are known from the first result
            outputs[done_stage] = [np.zeros((n,) + o.shape[1:], np.float32) for o in outs]
          for kept, o in zip(outputs[done_stage], outs):
            kept[rows] = o
          if stages[done_stage].answers:
            if probabilities is None:
              probabilities = np.zeros((n, outs[0].shape[-1]), np.float32)
            probabilities[rows] = outs[0]
          _route(rule, stages, done_stage, rows, held, outs, queues, sources, final)
        unread = []
    for row_sources in sources.values():  # the block's batches are freed
      for s, source in row_sources.items():
        if not isinstance(source, np.ndarray):
          row_sources[s] = np.array(source[0].host(to_host)[source[1]])
  if probabilities is None:
    probabilities = np.zeros((n, 0), np.float32)
  kept = tuple(tuple(outputs[s]) if outputs[s] is not None else () for s in range(count))
  return StagesRun(probabilities, final, ran, kept)


def _route(rule: StageRule, stages: Sequence[Stage], stage: int, rows: np.ndarray,
           held: _HeldBatch | None, outputs: tuple[np.ndarray, ...], queues: list[_Queue],
           sources: dict[int, dict[int, _Source]], final: np.ndarray) -> None:
  """Sends each of `rows` (just run at `stage`) on to its next stage's queue, or stops it."""
  go_to = np.asarray(rule.next_stages(stage, rows, outputs), np.int64)
  if ((go_to != STOP) & (go_to <= stage)).any() or (go_to >= len(stages)).any():
    raise ValueError(f"a rule sent rows from stage {stage} to stages {sorted(set(go_to))}: "
                     f"only a later stage of {len(stages)}, or STOP")
  for position, (row, target) in enumerate(zip(rows.tolist(), go_to.tolist())):
    if held is not None:
      sources.setdefault(row, {})[stage] = (held, position)
    if target == STOP:
      if not stages[stage].answers:
        raise ValueError(f"a rule stopped a row at stage {stage}, which gives no probabilities")
      final[row] = stage
      sources.pop(row, None)
    else:
      queues[target].rows.append(row)


def _fit_length(hidden: np.ndarray, length: int) -> np.ndarray:
  """One row's hidden states [L, d] cut or zero-padded to `length` positions: past its real
  tokens a row's positions are masked, so either is exact."""
  if len(hidden) >= length:
    return hidden[:length]
  return np.concatenate([hidden, np.zeros((length - len(hidden),) + hidden.shape[1:],
                                          hidden.dtype)])


def _inputs(sources: Sequence[_Source], lengths: np.ndarray, batch: Batch,
            to_host: Callable[[Any], np.ndarray]) -> tuple[Any, np.ndarray]:
  """A stage's (hidden states, mask) for these rows (`lengths` real tokens) as `batch` runs
  them: a whole held batch as it lies on the device, else the rows gathered on the host."""
  head = sources[0]
  if not isinstance(head, np.ndarray):
    held = head[0]
    if (held.size == batch.size and held.length == batch.length
        and held.count == len(sources) and all(
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
