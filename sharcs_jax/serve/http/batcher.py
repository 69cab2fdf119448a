"""Batching across requests: worker threads (one by default) run the engine on queued inputs,
oldest first.

The event loop only enqueues and awaits; a worker takes queued requests up to a token budget
(TEI's `max_batch_tokens`) whenever it frees, runs them through one `run` call, so the dispatch
core forms width groups across requests, and resolves each request's future on its loop. A
request's inputs are opaque here (the server queues them already tokenised).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any, Callable

import numpy as np

from sharcs_jax.serve.http.tei import RequestError


@dataclasses.dataclass
class Pending:
  inputs: Any  # what `run` takes a list of
  pairs: int
  tokens: int
  future: asyncio.Future
  loop: asyncio.AbstractEventLoop
  enqueued: float  # time.monotonic()
  started: float = 0.0


@dataclasses.dataclass(frozen=True)
class Limits:
  max_batch_tokens: int = 16384
  max_wait_ms: float = 0.0
  max_queued_pairs: int = 1024
  request_timeout_s: float = 30.0


def settle(pending: Pending, outcome: Any) -> None:
  """Resolve (or fail, for an exception) a request's future on its own loop, unless it is gone."""
  def resolve() -> None:
    if pending.future.done():  # the client disconnected and the handler cancelled it
      return
    if isinstance(outcome, BaseException):
      pending.future.set_exception(outcome)
    else:
      pending.future.set_result(outcome)
  pending.loop.call_soon_threadsafe(resolve)


def take_batch(queue: collections.deque, max_batch_tokens: int) -> list[Pending]:
  """Queued requests oldest-first while their tokens fit; always at least one."""
  batch = [queue.popleft()]
  tokens = batch[0].tokens
  while queue and tokens + queue[0].tokens <= max_batch_tokens:
    tokens += queue[0].tokens
    batch.append(queue.popleft())
  return batch


class Batcher:
  """A queue and its worker threads. `run(inputs) -> predictions` takes the batch's requests'
  inputs, oldest first, and answers their pairs in that order (`predictions[begin:end]` is one
  request's); `observe(batch, predictions, seconds)` is called after each run (metrics). With
  `workers` > 1 that many threads each take the next batch when free (`run` must be safe to
  call from several threads at once)."""

  def __init__(self, run: Callable[[list[Any]], Any], limits: Limits,
               observe: Callable[[list[Pending], Any, float], None] = lambda *_: None,
               workers: int = 1):
    if workers < 1:
      raise ValueError(f"workers={workers} must be at least 1")
    self.run, self.limits, self.observe = run, limits, observe
    self.queue: collections.deque[Pending] = collections.deque()
    self.queued_pairs = 0
    self.condition = threading.Condition()
    self.stopping = False
    self.threads = [threading.Thread(target=self.work, name=f"sharcs-batcher-{i}", daemon=True)
                    for i in range(workers)]
    for thread in self.threads:
      thread.start()

  def submit(self, inputs: Any, pairs: int, tokens: int) -> asyncio.Future:
    """Enqueue one request (from the event loop); 429 when its pairs do not fit the queue."""
    loop = asyncio.get_running_loop()
    with self.condition:
      if self.stopping:
        raise RequestError(503, "unhealthy", "the server is shutting down")
      if self.queued_pairs + pairs > self.limits.max_queued_pairs:
        raise RequestError(429, "overloaded", f"the queue holds {self.queued_pairs} pairs; "
                           f"--max_queued_pairs={self.limits.max_queued_pairs}")
      pending = Pending(inputs, pairs, tokens, loop.create_future(), loop, time.monotonic())
      self.queue.append(pending)
      self.queued_pairs += pairs
      self.condition.notify()
    return pending.future

  def queue_length(self) -> int:
    return self.queued_pairs

  def next_batch(self) -> list[Pending] | None:
    """Blocks for queued work (None once stopping and empty); drops requests past their timeout
    or whose client left."""
    with self.condition:
      while True:
        while not self.queue and not self.stopping:
          self.condition.wait()
        if not self.queue:
          return None
        if self.limits.max_wait_ms > 0 and not self.stopping:
          deadline = self.queue[0].enqueued + self.limits.max_wait_ms / 1e3
          while (not self.stopping and sum(p.tokens for p in self.queue)
                 < self.limits.max_batch_tokens and time.monotonic() < deadline):
            self.condition.wait(max(deadline - time.monotonic(), 0.0))
        batch = take_batch(self.queue, self.limits.max_batch_tokens)
        self.queued_pairs -= sum(p.pairs for p in batch)
        now = time.monotonic()
        live = []
        for pending in batch:
          if pending.future.done():
            continue  # cancelled: its client disconnected
          if now - pending.enqueued > self.limits.request_timeout_s:
            settle(pending, RequestError(504, "timeout", f"queued {now - pending.enqueued:.1f} "
                                         f"s, over --request_timeout_s="
                                         f"{self.limits.request_timeout_s:g}"))
            continue
          pending.started = now
          live.append(pending)
        if live:
          return live

  def work(self) -> None:
    while (batch := self.next_batch()) is not None:
      start = time.perf_counter()
      try:
        predictions = self.run([pending.inputs for pending in batch])
      except Exception as e:  # answered, never lost: the server reports a 500
        for pending in batch:
          settle(pending, e)
        continue
      seconds = time.perf_counter() - start
      offsets = np.cumsum([0] + [p.pairs for p in batch])
      for pending, begin, end in zip(batch, offsets[:-1], offsets[1:]):
        settle(pending, (predictions, int(begin), int(end), seconds))
      self.observe(batch, predictions, seconds)

  def drain(self, timeout_s: float) -> bool:
    """Refuse new requests, answer everything queued and in flight; True when done in time."""
    with self.condition:
      self.stopping = True
      self.condition.notify_all()
    deadline = time.monotonic() + timeout_s
    for thread in self.threads:
      thread.join(max(deadline - time.monotonic(), 0.0))
    return not any(thread.is_alive() for thread in self.threads)
