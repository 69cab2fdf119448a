"""Hardness labels as functional state: a confidence history and multi-hot width labels.

During training every example's p(true class) is recorded in the jitted train step, at the width
it trained with, into the slot of the current epoch. At the end of epoch e (0-indexed), once
e + 1 >= W, an example's label is the set of widths whose [lo, hi) range holds all of its last W
confidences; an example that fits no range gets full width only. Before that (the warm-up) every
label is full width. A top of 1.0 is inclusive, so c = 1.0 sits in the top range.

Pure array code: no model, no I/O.
"""

from __future__ import annotations

from typing import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class HardnessState:
  confidence: Array  # float32 [W, N]: slot e % W holds epoch e's p(true class)
  labels: Array  # float32 [N, m]: multi-hot admissible widths (last = full width)


SIGNALS = ("confidence", "entropy")


def easiness(probabilities: Array, labels: Array, signal: str) -> Array:
  """What the [lo, hi) ranges are compared with, per example; higher is easier.

  "confidence": p(true class), the paper's rule. "entropy": 1 - H(p) / log(classes), the paper's
  entropy-based variant, which ignores the label (a confidently wrong example counts as easy).
  """
  chex.assert_rank(probabilities, 2)
  if signal == "confidence":
    return jnp.take_along_axis(probabilities, labels[:, None], axis=1)[:, 0]
  if signal == "entropy":
    entropy = -jnp.sum(probabilities * jnp.log(jnp.maximum(probabilities, 1e-12)), axis=-1)
    return jnp.clip(1.0 - entropy / jnp.log(probabilities.shape[-1]), 0.0, 1.0)
  raise ValueError(f"unknown hardness signal {signal!r}; known: {SIGNALS}")


def init_hardness(num_examples: int, window: int, num_widths: int) -> HardnessState:
  labels = jnp.zeros((num_examples, num_widths), jnp.float32).at[:, -1].set(1.0)
  return HardnessState(confidence=jnp.zeros((window, num_examples), jnp.float32), labels=labels)


def record(state: HardnessState, ids: Array, confidence: Array, epoch: Array) -> HardnessState:
  """Writes this batch's confidences; ids >= N (padding rows) are dropped."""
  chex.assert_equal_shape([ids, confidence])
  slot = epoch % state.confidence.shape[0]
  return state.replace(confidence=state.confidence.at[slot, ids].set(confidence, mode="drop"))


def check_ranges(ranges: Sequence[Sequence[float]], num_widths: int) -> np.ndarray:
  array = np.asarray(ranges, np.float32)
  if array.shape != (num_widths, 2):
    raise ValueError(f"hardness ranges need one [lo, hi) pair per width ({num_widths}), "
                     f"got {ranges!r}")
  for i, (lo, hi) in enumerate(array):
    if not 0.0 <= lo < hi <= 1.0:
      raise ValueError(f"hardness range {i} [{lo}, {hi}) must satisfy 0 <= lo < hi <= 1")
  return array


def relabel(state: HardnessState, ranges: Array, epoch: Array) -> HardnessState:
  """Labels after epoch `epoch` (0-indexed) from the last W confidences; see the module doc."""
  window, num_widths = state.confidence.shape[0], state.labels.shape[1]
  chex.assert_shape(ranges, (num_widths, 2))
  low, high = jnp.min(state.confidence, axis=0), jnp.max(state.confidence, axis=0)  # [N]
  lo, hi = ranges[:, 0], ranges[:, 1]
  below_top = (high[:, None] < hi[None, :]) | (hi[None, :] >= 1.0)
  match = (low[:, None] >= lo[None, :]) & below_top  # [N, m]
  full = jnp.zeros_like(state.labels).at[:, -1].set(1.0)
  labels = jnp.where(jnp.any(match, axis=1, keepdims=True), match.astype(jnp.float32), full)
  warmed_up = epoch + 1 >= window
  return state.replace(labels=jnp.where(warmed_up, labels, full))


def assign_widths(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """For each example, one admissible width index, uniformly at random."""
  scores = rng.random(labels.shape) * (labels > 0)
  return np.argmax(scores, axis=1).astype(np.int32)
