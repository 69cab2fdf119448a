"""The batcher on a fake engine: oldest-first under a token budget, 429, 504, dropped clients."""

from __future__ import annotations

import asyncio
import threading
import types

import numpy as np
import pytest

from sharcs_jax.serve.http.batcher import Batcher, Limits
from sharcs_jax.serve.http.tei import RequestError


def fake_engine(gate: threading.Event | None = None):
  calls = []

  def predict(inputs):
    if gate is not None:
      gate.wait(10)
    rows = [row for rows in inputs for row in rows]
    calls.append(rows)
    n = len(rows)
    return types.SimpleNamespace(widths=np.ones(n, np.float32),
                                 probabilities=np.full((n, 2), 0.5, np.float32))
  return predict, calls


def test_batches_form_across_requests_oldest_first_within_the_token_budget():
  gate = threading.Event()
  predict, calls = fake_engine(gate)
  batcher = Batcher(predict, Limits(max_batch_tokens=10))

  async def main():
    first = batcher.submit([("a",)], 1, 1)  # taken alone while the others queue
    await asyncio.sleep(0.05)
    rest = [batcher.submit([(str(i),)], 1, 4) for i in range(4)]
    gate.set()
    return [await f for f in [first, *rest]]

  results = asyncio.run(main())
  assert calls == [[("a",)], [("0",), ("1",)], [("2",), ("3",)]]
  assert [(begin, end) for _, begin, end, _ in results] == [(0, 1), (0, 1), (1, 2), (0, 1),
                                                           (1, 2)]
  assert batcher.drain(5)


def test_a_full_queue_is_429_for_the_whole_request_and_a_stale_one_504():
  gate = threading.Event()
  predict, calls = fake_engine(gate)
  batcher = Batcher(predict, Limits(max_queued_pairs=3, request_timeout_s=0.1))

  async def main():
    running = batcher.submit([("a",)], 1, 1)
    await asyncio.sleep(0.05)
    stale = batcher.submit([("b",), ("c",)], 2, 2)
    with pytest.raises(RequestError) as full:
      batcher.submit([("d",), ("e",)], 2, 2)  # 2 + 2 > 3: none of it queues
    await asyncio.sleep(0.2)
    gate.set()
    await running
    with pytest.raises(RequestError) as late:
      await stale
    return full.value, late.value

  full, late = asyncio.run(main())
  assert full.status == 429 and late.status == 504
  assert calls == [[("a",)]]
  assert batcher.drain(5)


def test_a_cancelled_request_is_dropped_and_drain_answers_the_rest():
  gate = threading.Event()
  predict, calls = fake_engine(gate)
  batcher = Batcher(predict, Limits())

  async def main():
    running = batcher.submit([("a",)], 1, 1)
    await asyncio.sleep(0.05)
    gone = batcher.submit([("b",)], 1, 1)
    kept = batcher.submit([("c",)], 1, 1)
    gone.cancel()  # its client disconnected
    threading.Timer(0.1, gate.set).start()
    drained = await asyncio.to_thread(batcher.drain, 5)
    with pytest.raises(RequestError) as refused:
      batcher.submit([("d",)], 1, 1)
    return drained, await running, await kept, refused.value

  drained, _, _, refused = asyncio.run(main())
  assert drained and refused.status == 503
  assert calls == [[("a",)], [("c",)]]


def test_two_workers_run_two_batches_at_once_and_drain_both():
  gate = threading.Event()
  predict, calls = fake_engine(gate)
  batcher = Batcher(predict, Limits(max_batch_tokens=1), workers=2)

  async def main():
    first = batcher.submit([("a",)], 1, 1)
    second = batcher.submit([("b",)], 1, 1)
    third = batcher.submit([("c",)], 1, 1)
    await asyncio.sleep(0.1)
    queued = batcher.queue_length()  # both workers hold a request at the gate; one waits
    gate.set()
    return queued, [await f for f in (first, second, third)]

  queued, results = asyncio.run(main())
  assert queued == 1 and sorted(calls) == [[("a",)], [("b",)], [("c",)]]
  assert [(begin, end) for _, begin, end, _ in results] == [(0, 1)] * 3
  assert batcher.drain(5)
  with pytest.raises(ValueError, match="workers=0"):
    Batcher(predict, Limits(), workers=0)
