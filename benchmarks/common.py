"""Shared pieces of the benchmarks: real QQP inputs, side-by-side timing, report files."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sharcs_jax import evaluate, report, routing  # noqa: E402
from sharcs_jax.data import batching, glue  # noqa: E402
from sharcs_jax.engine import Engine  # noqa: E402


def glue_data_dir(data_dir: str | None) -> str | None:
  """The flag's directory, else $SHARCS_DATA_DIR, else ../shared/data/glue beside the checkout,
  else None (the hub)."""
  if not data_dir and not os.environ.get(glue.DATA_DIR_ENV):
    beside = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
    data_dir = beside if os.path.isdir(beside) else None
  return glue.resolve_data_dir(data_dir)


def qqp_dev(data_dir: str | None, length_buckets: tuple[int, ...], tokenizer,
            limit: int = 0) -> batching.Encoded:
  split = glue.load_split("qqp", "dev", glue_data_dir(data_dir), limit=limit)
  return batching.encode(split, tokenizer, length_buckets)


@dataclasses.dataclass(frozen=True)
class BudgetSweep:
  """A trained run's dev predictions at every width and its router on a calibration split.

  Every budget of a sweep is one calibration and one summary over these arrays, so the model runs
  once per split however many budgets are asked for.
  """
  engine: Engine
  dev: batching.Encoded
  calibration_router: np.ndarray
  calibration_flops: np.ndarray
  dev_probabilities: np.ndarray
  dev_router: np.ndarray

  @classmethod
  def build(cls, engine: Engine, dev: batching.Encoded,
            calibration: batching.Encoded) -> "BudgetSweep":
    params, batch = engine.params["params"], engine.batch_buckets[-1]
    probabilities, dev_router = evaluate.predict_all_widths(engine.programs, params, dev, batch)
    return cls(engine, dev,
               evaluate.router_logits(engine.programs, params, calibration, batch),
               evaluate.per_example_flops(engine.flops, calibration), probabilities, dev_router)

  def reachable(self) -> tuple[float, float]:
    return routing.reachable_reductions(self.calibration_flops)

  def summary(self, rule: routing.Rule = routing.Rule()) -> dict:
    """Dev metrics at full width, each static width and routed (the router's argmax by default)."""
    return evaluate.summarize(self.dev_probabilities, self.dev_router, self.dev,
                              self.engine.flops, self.engine.task.metrics, rule)

  def at_budget(self, budget: routing.Budget) -> tuple[routing.Rule, dict]:
    """The rule calibrated to `budget` and its routed dev metrics; ValueError if out of reach."""
    rule = routing.calibrate(self.calibration_router, self.calibration_flops, budget)
    return rule, self.summary(rule)["sharcs"]


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


def plot_width_mixture(ax, points: list[tuple[float, float]], reference_gflops: float,
                       color: str) -> None:
  """Joins fixed-width points (GFLOPs, accuracy %) by what sending a share of the inputs to each of
  two neighbours gives: straight in GFLOPs, so a curve against the reduction axis. The line a
  router must beat; drawn straight against the reduction it would lie too high in between."""
  points = sorted(points)
  share = np.linspace(0.0, 1.0, 51)
  for (g0, a0), (g1, a1) in zip(points, points[1:]):
    ax.plot(reference_gflops / (g0 + share * (g1 - g0)), a0 + share * (a1 - a0), "--",
            color=color, linewidth=1)


def save_accuracy_plot(fig, ax, title: str, path: str) -> None:
  """Finishes an accuracy-against-FLOPs-reduction figure the way every benchmark draws it."""
  ax.set_xlabel("FLOPs reduction vs full width (dev average, XLA cost analysis)")
  ax.set_ylabel("dev accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  report.save_figure(fig, path)
