"""Inference engine: ahead-of-time compiled executables and dispatch grouped by routed width.

At start-up the engine compiles (`jit(...).lower(...).compile()`) one executable for the prefix
and router per (batch bucket, length bucket), and one for each width's adaptive part per
(width, batch bucket, length bucket). Serving then never traces or compiles: on tokenised,
length-bucketed inputs it runs the prefix once per input, groups the inputs by routed width, runs each group on its width's
executable and puts the results back in input order.

Per-executable FLOPs come from `compiled.cost_analysis()`; an example's FLOPs are its share of the
prefix executable plus its share of its width's executable.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sharcs_jax.data.batching import Encoded, make_batch
from sharcs_jax.flops import compiled_flops
from sharcs_jax.model.sharcs import SharcsModel


@dataclasses.dataclass(frozen=True)
class Predictions:
  labels: np.ndarray  # int32 [N]
  probabilities: np.ndarray  # float32 [N, C]
  widths: np.ndarray  # float32 [N] the routed width
  gflops: np.ndarray  # float64 [N] per example: prefix + router + routed part


def _chunks(rows: np.ndarray, batch_buckets: Sequence[int]) -> list[tuple[np.ndarray, int]]:
  """Rows split into full batches of the largest bucket, the rest into the smallest that fits."""
  largest = batch_buckets[-1]
  out = []
  for start in range(0, len(rows), largest):
    part = rows[start:start + largest]
    out.append((part, next(b for b in batch_buckets if b >= len(part))))
  return out


class Engine:
  """Precompiled SHARCS inference for one model and parameter tree."""

  def __init__(self, model: SharcsModel, params: Any, *, length_buckets: Sequence[int],
               batch_buckets: Sequence[int] = (1, 8, 32)):
    if list(batch_buckets) != sorted(set(batch_buckets)) or batch_buckets[0] < 1:
      raise ValueError(f"batch_buckets must be increasing sizes >= 1, got {tuple(batch_buckets)}")
    self.model = model
    self.params = {"params": params}
    self.length_buckets = tuple(length_buckets)
    self.batch_buckets = tuple(batch_buckets)
    self.widths = model.widths
    d = model.encoder.hidden_size
    variables = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       self.params)

    def prefix(variables, ids, mask, types):
      return model.apply(variables, ids, mask, types, method=SharcsModel.prefix)

    def adaptive(variables, hidden, mask, width):
      logits = model.apply(variables, hidden, mask, width=width, method=SharcsModel.adaptive).logits
      return jax.nn.softmax(logits, axis=-1)

    self.prefix_exe, self.adaptive_exe, self.flops = {}, {}, {}
    for b, s in itertools.product(self.batch_buckets, self.length_buckets):
      ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
      exe = jax.jit(prefix).lower(variables, ids, ids, ids).compile()
      self.prefix_exe[b, s] = exe
      self.flops["prefix", b, s] = compiled_flops(exe)
      hidden = jax.ShapeDtypeStruct((b, s, d), jnp.float32)
      for w in self.widths:
        exe = jax.jit(adaptive, static_argnames="width").lower(variables, hidden, ids,
                                                               width=w).compile()
        self.adaptive_exe[w, b, s] = exe
        self.flops[w, b, s] = compiled_flops(exe)

  def example_gflops(self, width: float, length_bucket: int) -> float:
    """FLOPs of one example at batch size 1: prefix and router, then its width's part."""
    return (self.flops["prefix", 1, length_bucket] + self.flops[width, 1, length_bucket]) / 1e9

  def run(self, data: Encoded) -> Predictions:
    """Predictions for every row of `data`, in row order."""
    if data.length_buckets != self.length_buckets:
      raise ValueError(f"inputs were bucketed to {data.length_buckets}, the engine was compiled "
                       f"for {self.length_buckets}")
    n, d = len(data), self.model.encoder.hidden_size
    classes = self.model.num_classes
    hidden = {}  # row -> (prefix output [S, d], mask [S])
    routed = np.zeros(n, np.int32)
    for bucket, length in enumerate(self.length_buckets):
      rows = np.flatnonzero(data.bucket_of == bucket)
      for part, size in _chunks(rows, self.batch_buckets):
        batch = make_batch(data, part, bucket, size)
        h, router_logits = self.prefix_exe[size, length](
            self.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        h = np.asarray(h)
        routed[part] = np.asarray(router_logits)[:len(part)].argmax(-1)
        for i, row in enumerate(part):
          hidden[row] = (h[i], batch["attention_mask"][i])
    probabilities = np.zeros((n, classes), np.float32)
    gflops = np.zeros(n, np.float64)
    for w_index, w in enumerate(self.widths):
      for bucket, length in enumerate(self.length_buckets):
        rows = np.flatnonzero((routed == w_index) & (data.bucket_of == bucket))
        for part, size in _chunks(rows, self.batch_buckets):
          h = np.zeros((size, length, d), np.float32)
          mask = np.zeros((size, length), np.int32)
          mask[:, 0] = 1
          for i, row in enumerate(part):
            h[i], mask[i] = hidden[row]
          probs = self.adaptive_exe[w, size, length](self.params, h, mask)
          probabilities[part] = np.asarray(probs)[:len(part)]
        gflops[rows] = self.example_gflops(w, length)
    return Predictions(labels=probabilities.argmax(-1).astype(np.int32),
                       probabilities=probabilities,
                       widths=np.asarray(self.widths, np.float32)[routed], gflops=gflops)
