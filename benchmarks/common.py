"""Shared pieces of the benchmarks: real QQP inputs, side-by-side timing, report files."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sharcs_jax import report  # noqa: E402
from sharcs_jax.data import batching, glue  # noqa: E402


def qqp_dev(data_dir: str | None, length_buckets: tuple[int, ...], tokenizer,
            limit: int = 0) -> batching.Encoded:
  """QQP dev pairs ($SHARCS_DATA_DIR, else ../shared/data/glue beside the checkout, else hub)."""
  if not data_dir and not os.environ.get(glue.DATA_DIR_ENV):
    beside = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
    data_dir = beside if os.path.isdir(beside) else None
  split = glue.load_split("qqp", "dev", glue.resolve_data_dir(data_dir), limit=limit)
  return batching.encode(split, tokenizer, length_buckets)


def time_side_by_side(candidates: dict[str, Callable[[], object]], rounds: int,
                      warmup: int = 3, progress: bool = True) -> dict[str, np.ndarray]:
  """Seconds per call of each candidate, measured in interleaved rounds.

  Interleaving spreads the machine's background noise over all candidates alike, so their
  ratios hold even when absolute times drift. The order is shuffled every round: a candidate
  that always ran right after PyTorch would pay for its OpenMP threads still spinning.
  """
  order = np.random.default_rng(0)
  for fn in candidates.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in candidates}
  start = time.time()
  for r in range(rounds):
    for i in order.permutation(len(candidates)):
      name, fn = list(candidates.items())[i]
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    if progress and (time.time() - start > 10 or r == rounds - 1):
      print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
      start = time.time()
  return {name: np.asarray(t) for name, t in times.items()}


def write_outputs(out_dir: str, name: str, data: dict, title: str, header: list[str],
                  rows: list[list], notes: str = "") -> None:
  os.makedirs(out_dir, exist_ok=True)
  report.write_json(os.path.join(out_dir, f"{name}.json"), data)
  report.write_atomic(os.path.join(out_dir, f"{name}.md"),
                      f"# {title}\n\n{notes}\n\n" + report.markdown_table(header, rows))


def save_accuracy_plot(fig, ax, title: str, path: str) -> None:
  """Finishes an accuracy-against-FLOPs-reduction figure the way every benchmark draws it."""
  ax.set_xlabel("FLOPs reduction vs full width (dev average, XLA cost analysis)")
  ax.set_ylabel("dev accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  report.save_figure(fig, path)
