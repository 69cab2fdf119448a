"""Inference engine: routed dispatch over ahead-of-time compiled programs.

For a list of texts (or text pairs) the engine tokenises into the length buckets, runs the prefix
and router once per input, groups the inputs by routed width and length bucket, runs each group on
that width's program and returns labels, probabilities and widths in the input order. Programs are
compiled (or loaded from disk, see `programs.py`) when the engine is built; serving never traces or
compiles.

FLOPs per example are the XLA cost-analysis FLOPs of the batch-1 programs at the example's length
bucket: prefix and router, plus the routed width's part. The width comes from a routing rule
(`routing.py`): the router's argmax, or argmax under a FLOPs budget calibrated on held-out inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from absl import logging

from sharcs_jax import evaluate
from sharcs_jax.data import batching, glue
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.programs import Programs
from sharcs_jax.routing import Budget, Rule, calibrate, parse_budget

Text = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class Predictions:
  labels: np.ndarray  # int32 [N]
  probabilities: np.ndarray  # float32 [N, C]
  widths: np.ndarray  # float32 [N] the routed width
  gflops: np.ndarray  # float64 [N] per example: prefix + router + routed part


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


class Engine:
  """SHARCS inference for one model and parameter tree, on precompiled programs."""

  def __init__(self, model: SharcsModel, params: Any, *, length_buckets: Sequence[int],
               batch_buckets: Sequence[int] = (1, 8, 32), tokenizer: Any = None,
               task: glue.Task | None = None, cache_dir: str | None = None,
               rule: Rule = Rule()):
    self.model = model
    self.params = {"params": params}
    self.length_buckets = tuple(length_buckets)
    self.batch_buckets = tuple(batch_buckets)
    self.widths = model.widths
    self.tokenizer = tokenizer
    self.task = task
    # Rows per prefix-then-dispatch round: bounds the hidden states held between the two (about
    # 20 MB at length 32 for MiniLM) while leaving each width a few full batches.
    self.block_size = 16 * self.batch_buckets[-1]
    self.programs = Programs(model, params, batch_buckets=batch_buckets,
                             length_buckets=length_buckets, cache_dir=cache_dir)
    self.flops = evaluate.example_flops_table(self.programs)  # [m, length buckets]
    self.rule = rule
    self.config = None  # the training run's config, when loaded from a workdir

  @classmethod
  def from_workdir(cls, workdir: str, *, batch_buckets: Sequence[int] = (1, 8, 32),
                   cache_dir: str | None = None, budget: str = "") -> "Engine":
    """The kept model of a training run; programs are stored under `workdir/executables`.

    Routing is the rule the run reported, or with `budget` ("2.5x", "0.4gflops") a rule
    calibrated now on the run's calibration split (its held-out training examples).
    """
    from sharcs_jax.checkpoint import load_trained  # orbax only where checkpoints are read
    from sharcs_jax.model.weights import resolve_model_dir

    config, model, params = load_trained(workdir)
    engine = cls(model, params, length_buckets=tuple(config.data.length_buckets),
                 batch_buckets=batch_buckets,
                 tokenizer=batching.load_tokenizer(resolve_model_dir(config.model.backbone)),
                 task=glue.get_task(config.task),
                 cache_dir=cache_dir or os.path.join(workdir, "executables"),
                 rule=trained_rule(workdir))
    engine.config = config
    if budget:
      split = glue.calibration_split(config)
      engine.rule = engine.calibrate(budget, batching.encode(split, engine.tokenizer,
                                                             engine.length_buckets))
      logging.info("Routing to budget %s: cost weight %.4f, %.3fx on %d %s examples", budget,
                   engine.rule.cost_weight, engine.rule.calibration_reduction, len(split),
                   split.name)
    return engine

  def calibrate(self, budget: Budget | str, data: batching.Encoded) -> Rule:
    """The budget rule calibrated on `data` (inputs the model did not train on); not applied."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    router = evaluate.router_logits(self.programs, self.params["params"], data,
                                    self.batch_buckets[-1])
    return calibrate(router, evaluate.per_example_flops(self.flops, data), budget)

  def example_gflops(self, width: float, length: int) -> float:
    """GFLOPs of one example routed to `width` at padded length `length`."""
    return self.programs.example_flops(width, length) / 1e9

  def full_width_gflops(self, data: batching.Encoded) -> np.ndarray:
    """Per-example GFLOPs [N] had every example run at full width: the reduction's baseline."""
    return self.flops[-1, data.bucket_of] / 1e9

  def encode(self, texts: Sequence[Text], labels: Sequence[int] | None = None) -> batching.Encoded:
    """Tokenised inputs; a wrong number of fields is an error naming the input."""
    if self.tokenizer is None or self.task is None:
      raise ValueError("this engine has no tokenizer and task: build it with from_workdir, or "
                       "pass tokenizer= and task=")
    fields = len(self.task.text_columns)
    rows = []
    for i, text in enumerate(texts):
      row = (text,) if isinstance(text, str) else tuple(text)
      if len(row) != fields or not all(isinstance(t, str) for t in row):
        raise ValueError(f"input {i} has {len(row)} field(s) {row!r:.120}; {self.task.name} "
                         f"takes {fields} string(s): {', '.join(self.task.text_columns)}")
      rows.append(row)
    return batching.encode_texts(rows, self.tokenizer, self.length_buckets, labels)

  def predict(self, texts: Sequence[Text]) -> Predictions:
    return self.run(self.encode(texts))

  def run(self, data: batching.Encoded) -> Predictions:
    """Predictions for every row of `data`, in row order."""
    if data.length_buckets != self.length_buckets:
      raise ValueError(f"inputs were bucketed to {data.length_buckets}, the engine was compiled "
                       f"for {self.length_buckets}")
    n = len(data)
    probabilities = np.zeros((n, self.model.num_classes), np.float32)
    routed = np.zeros(n, np.int32)
    gflops = np.zeros(n, np.float64)
    for bucket, length in enumerate(self.length_buckets):
      for rows in _blocks(np.flatnonzero(data.bucket_of == bucket), self.block_size):
        self._run_block(data, rows, bucket, probabilities, routed, gflops)
    return Predictions(labels=probabilities.argmax(-1).astype(np.int32),
                       probabilities=probabilities,
                       widths=np.asarray(self.widths, np.float32)[routed], gflops=gflops)

  def _run_block(self, data: batching.Encoded, rows: np.ndarray, bucket: int,
                 probabilities: np.ndarray, routed: np.ndarray, gflops: np.ndarray) -> None:
    """Prefix and router for `rows` (one length bucket), then each width's group.

    A group that is exactly one prefix batch (the common case of a request routed to one width)
    takes that batch's hidden states as they lie on the device; other groups are gathered on the
    host from all of the block's prefix outputs.
    """
    length = self.length_buckets[bucket]
    batches, router, mask = self._prefix(data, rows, bucket)
    whole_batches = {(b.start, b.count, b.size): b for b in batches}
    host_hidden = None
    routed[rows] = self.rule.choose(router, np.broadcast_to(self.flops[:, bucket], router.shape))
    pending = []  # dispatch every group before reading any result: host work overlaps compute
    for w_index, width in enumerate(self.widths):
      group = np.flatnonzero(routed[rows] == w_index)  # positions within this block, ascending
      for start, size in split_into_batches(len(group), self.batch_buckets):
        part = group[start:start + size]
        whole = whole_batches.get((int(part[0]), len(part), size))
        if whole is not None and part[-1] - part[0] == len(part) - 1:
          inputs = (whole.hidden, whole.mask)
        else:
          if host_hidden is None:
            host_hidden = np.concatenate([np.asarray(b.hidden)[:b.count] for b in batches])
          inputs = (_pad(host_hidden[part], size), _pad_mask(mask[part], size))
        program = self.programs("adaptive", width, size, length)
        pending.append((rows[part], program(self.params, *inputs)))
      gflops[rows[group]] = self.flops[w_index, bucket] / 1e9
    for targets, probs in pending:
      probabilities[targets] = np.asarray(probs)[:len(targets)]

  def _prefix(self, data: batching.Encoded, rows: np.ndarray, bucket: int
              ) -> tuple[list[_PrefixBatch], np.ndarray, np.ndarray]:
    """Prefix outputs for `rows` (all in one length bucket): the batches as run (hidden states
    left on the device), router logits [n, m] and attention masks [n, S] on the host."""
    length = self.length_buckets[bucket]
    batches, pending = [], []
    mask = np.zeros((len(rows), length), np.int32)
    for start, size in split_into_batches(len(rows), self.batch_buckets):
      part = rows[start:start + size]
      batch = batching.make_batch(data, part, bucket, size)
      mask[start:start + len(part)] = batch["attention_mask"][:len(part)]
      hidden, router = self.programs("prefix", None, size, length)(
          self.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
      batches.append(_PrefixBatch(start, len(part), size, hidden, batch["attention_mask"]))
      pending.append(router)
    router = np.concatenate([np.asarray(r)[:b.count] for r, b in zip(pending, batches)])
    return batches, router, mask


@dataclasses.dataclass(frozen=True)
class _PrefixBatch:
  start: int  # first row within the block
  count: int  # real rows; the rest of `size` is padding
  size: int  # the batch bucket it ran at
  hidden: Any  # jax.Array [size, S, d], on the device
  mask: np.ndarray  # int32 [size, S], padding rows included


def trained_rule(workdir: str) -> Rule:
  """The routing rule the run in `workdir` reported for its kept epoch (argmax when none)."""
  path = os.path.join(workdir, "report.json")
  if not os.path.isfile(path):
    return Rule()
  with open(path) as f:
    routing = json.load(f).get("sharcs", {}).get("routing")
  if not routing:
    return Rule()
  logging.info("Routing as trained: budget %s, cost weight %.4f", routing["budget"],
               routing["cost_weight"])
  return Rule(routing["cost_weight"], routing["budget"], routing["calibration_reduction"])


def _blocks(rows: np.ndarray, size: int) -> list[np.ndarray]:
  return [rows[i:i + size] for i in range(0, len(rows), size)]


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  return x if len(x) == size else np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:],
                                                              x.dtype)])


def _pad_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Padding rows attend to one token, so that no softmax is empty."""
  padded = _pad(mask, size)
  padded[len(mask):, 0] = 1
  return padded
