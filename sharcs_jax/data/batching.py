"""Tokenisation, static length buckets and fixed-size batches.

XLA compiles one program per shape, so every batch has a fixed batch size and one of a few padded
lengths (the config's `length_buckets`). A short last batch is filled with dummy rows that carry
weight 0 and the out-of-range id N, so they neither count in the loss nor write hardness state.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from sharcs_jax.data.glue import Split
from sharcs_jax.data.padding import (length_bucket_of, length_mask, pack_rows, pad_mask,
                                      pad_rows)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Encoded:
  """A tokenised split, padded to the longest bucket; rows are examples in id order."""

  input_ids: np.ndarray  # int32 [N, max_len]
  token_type_ids: np.ndarray  # int32 [N, max_len]
  lengths: np.ndarray  # int32 [N] real tokens after truncation
  labels: np.ndarray  # int32 [N]
  ids: np.ndarray  # int32 [N] stable example ids
  bucket_of: np.ndarray  # int32 [N] index into length_buckets
  length_buckets: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.labels)


def load_tokenizer(model_dir: str):
  from transformers import AutoTokenizer  # tokenizers only; no model code is used

  return AutoTokenizer.from_pretrained(model_dir)


def encode(split: Split, tokenizer, length_buckets: tuple[int, ...]) -> Encoded:
  return encode_texts(split.texts, tokenizer, length_buckets, split.labels, split.ids)


def encode_texts(texts: Sequence[tuple[str, ...]], tokenizer, length_buckets: tuple[int, ...],
                 labels: Sequence[int] | None = None, ids: Sequence[int] | None = None) -> Encoded:
  """Texts longer than the last bucket are truncated (longest sequence of a pair first).

  Unlabelled inputs get label 0; ids default to the row numbers.
  """
  max_len = length_buckets[-1]
  n = len(texts)
  columns = [list(column) for column in zip(*texts)]
  enc = {"input_ids": [], "token_type_ids": []}  # the tokenizer cannot take an empty batch
  if n:  # unpadded lists, packed below (faster than the tokenizer's padding to max_len)
    enc = tokenizer(*columns, truncation=True, max_length=max_len, return_token_type_ids=True,
                    return_attention_mask=False)
  input_ids, lengths = pack_rows(enc["input_ids"], max_len, tokenizer.pad_token_id or 0)
  token_type_ids, _ = pack_rows(enc["token_type_ids"], max_len)
  bucket_of = length_bucket_of(lengths, length_buckets)
  return Encoded(input_ids, token_type_ids, lengths,
                 np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32),
                 np.arange(n, dtype=np.int32) if ids is None else np.asarray(ids, np.int32),
                 bucket_of, tuple(length_buckets))


def concatenate(parts: Sequence[Encoded]) -> Encoded:
  """Rows of `parts` in order, ids renumbered to the row numbers (requests encoded one by one
  and run as one batch)."""
  buckets = {part.length_buckets for part in parts}
  if len(buckets) != 1:
    raise ValueError(f"cannot concatenate inputs bucketed to {sorted(buckets)}")
  stack = lambda name: np.concatenate([getattr(part, name) for part in parts])
  n = sum(len(part) for part in parts)
  return Encoded(stack("input_ids"), stack("token_type_ids"), stack("lengths"), stack("labels"),
                 np.arange(n, dtype=np.int32), stack("bucket_of"), buckets.pop())


def encode_splits(splits: Sequence[Split | None], tokenizer, length_buckets: tuple[int, ...]
                  ) -> tuple[Encoded | None, ...]:
  """Splits tokenised into the length buckets, in order: the one place a run's splits are
  encoded. None stays None; a split given twice (calibration on dev) is encoded once."""
  done: dict[int, Encoded] = {}
  for split in splits:
    if split is not None and id(split) not in done:
      done[id(split)] = encode(split, tokenizer, length_buckets)
  return tuple(None if s is None else done[id(s)] for s in splits)


def attention_mask_of(data: Encoded, rows: np.ndarray, length: int) -> np.ndarray:
  """int32 [len(rows), length]: 1 on each row's real tokens."""
  return length_mask(data.lengths[rows], length)


def make_batch(data: Encoded, rows: np.ndarray, bucket: int, batch_size: int) -> Batch:
  """Rows `rows` (at most batch_size) padded to length_buckets[bucket] and to batch_size."""
  if len(rows) > batch_size:
    raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
  length = data.length_buckets[bucket]
  fill = batch_size - len(rows)
  return {
      "input_ids": pad_rows(data.input_ids[rows, :length], batch_size),
      "attention_mask": pad_mask(attention_mask_of(data, rows, length), batch_size),
      "token_type_ids": pad_rows(data.token_type_ids[rows, :length], batch_size),
      "label": np.concatenate([data.labels[rows], np.zeros(fill, np.int32)]),
      "id": np.concatenate([data.ids[rows], np.full(fill, len(data), np.int32)]),
      "weight": np.concatenate([np.ones(len(rows), np.float32), np.zeros(fill, np.float32)]),
  }


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  width_index: int
  bucket: int
  rows: np.ndarray


def _width_batches(data: Encoded, rows: np.ndarray, width_index: int, batch_size: int,
                   rng: np.random.Generator) -> list[PlannedBatch]:
  """One shuffled pass over `rows` in single-length batches, the buckets mixed."""
  batches = []
  for b in range(len(data.length_buckets)):
    in_bucket = rows[data.bucket_of[rows] == b]
    rng.shuffle(in_bucket)
    batches += [PlannedBatch(width_index, b, in_bucket[i:i + batch_size])
                for i in range(0, len(in_bucket), batch_size)]
  return [batches[i] for i in rng.permutation(len(batches))]


def plan_train_epoch(data: Encoded, width_index: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> list[PlannedBatch]:
  """Single-width, single-length batches in rounds that hold one batch of every width.

  As the method prescribes, every width trains in every round: a width with fewer examples
  repeats its own batches (reshuffled) until the most populous width has used all of its.
  Without that, once most examples are labelled easy the full width gets few updates and loses
  accuracy. Every example is trained at least once.
  """
  per_width = {}
  for w in np.unique(width_index):
    rows = np.flatnonzero(width_index == w)
    per_width[int(w)] = (rows, _width_batches(data, rows, int(w), batch_size, rng))
  rounds = max((len(batches) for _, batches in per_width.values()), default=0)
  for w, (rows, batches) in per_width.items():
    while len(batches) < rounds:
      batches += _width_batches(data, rows, w, batch_size, rng)
  return [per_width[w][1][i] for i in range(rounds) for w in sorted(per_width)]


def eval_batches(data: Encoded, batch_size: int) -> Iterator[tuple[np.ndarray, Batch]]:
  """(rows, batch) over every example once, grouped by length bucket."""
  for b in range(len(data.length_buckets)):
    rows = np.flatnonzero(data.bucket_of == b)
    for i in range(0, len(rows), batch_size):
      yield rows[i:i + batch_size], make_batch(data, rows[i:i + batch_size], b, batch_size)
