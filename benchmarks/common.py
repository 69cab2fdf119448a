"""Shared pieces of the benchmarks: real GLUE dev inputs, the full-width baseline, side-by-side
timing, report files."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from typing import Callable

import numpy as np

from sharcs_jax.serve import dispatch, routing
from sharcs_jax import evaluate
from sharcs_jax import report
from sharcs_jax.data import batching, glue
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.programs import Programs


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
  """The CPU model and the instruction-set flags that decide the int8 and bf16 kernels."""
  fields: dict[str, str] = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's
  present = set(fields.get("flags", "").split())
  return {"model": fields.get("model name") or platform.processor() or "unknown",
          "flags": {f: f in present for f in CPU_FLAGS},
          "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}


def cpu_line(cpu: dict) -> str:
  """`cpu_info` in words, for a report's notes: every number is named with its CPU."""
  flags = ", ".join(f for f, on in cpu["flags"].items() if on) or "none of " + ", ".join(cpu["flags"])
  return f"{cpu['model']}, {cpu['usable_cpus']} usable CPUs, flags {flags}"


def dev_split(task: str, data_dir: str | None, limit: int = 0) -> glue.Split:
  """A task's dev texts and labels, found as every benchmark finds them."""
  return glue.load_split(task, "dev", glue.resolve_data_dir(data_dir), limit=limit)


def full_width_probabilities(programs: Programs, params, data: batching.Encoded) -> np.ndarray:
  """The baseline: every example through the whole model at width 1.0, no router; [N, C]."""
  variables = {"params": params}
  return dispatch.run_each_row(
      lambda size, length, *inputs: programs("forward", 1.0, size, length)(variables, *inputs),
      data.input_ids, data.token_type_ids, data.lengths, columns=programs.model.num_classes,
      program_lengths=data.length_buckets, batch_buckets=programs.batch_buckets)


def full_width_labels(programs: Programs, params, data: batching.Encoded) -> np.ndarray:
  return full_width_probabilities(programs, params, data).argmax(-1).astype(np.int32)


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
  calibration_probabilities: np.ndarray  # [m, N, C]: what a cascade is calibrated on
  calibration_prefix_flops: np.ndarray  # [N]
  dev_probabilities: np.ndarray
  dev_router: np.ndarray

  @classmethod
  def build(cls, engine: Engine, dev: batching.Encoded,
            calibration: batching.Encoded) -> "BudgetSweep":
    params, batch = engine.variables["params"], engine.batch_buckets[-1]
    probabilities, dev_router = evaluate.predict_all_widths(engine.programs, params, dev, batch,
                                                            engine.runner)
    calibration_probabilities, calibration_router = evaluate.predict_all_widths(
        engine.programs, params, calibration, batch, engine.runner)
    return cls(engine, dev, calibration_router,
               evaluate.per_example_flops(engine.flops, calibration), calibration_probabilities,
               engine.prefix_flops[calibration.bucket_of], probabilities, dev_router)

  def reachable(self) -> tuple[float, float]:
    return routing.reachable_reductions(self.calibration_flops)

  def summary(self, rule: routing.Rule | routing.Cascade = routing.Rule()) -> dict:
    """Dev metrics at full width, each static width and routed (the router's argmax by default)."""
    return evaluate.summarize(self.dev_probabilities, self.dev_router, self.dev,
                              self.engine.flops, self.engine.task.metrics, rule,
                              self.engine.prefix_flops)

  def at_budget(self, budget: routing.Budget, rule: str = "router", signal: str = "max_prob",
                start_budget: routing.Budget | None = None
                ) -> tuple[routing.Rule | routing.Cascade, dict]:
    """The rule named `rule` calibrated to `budget` and its routed dev metrics; ValueError if out
    of reach."""
    calibrated = routing.calibrate_rule(rule, budget, self.calibration_router,
                                        self.calibration_flops, self.calibration_probabilities,
                                        self.calibration_prefix_flops, signal, start_budget)
    return calibrated, self.summary(calibrated)["sharcs"]


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


def save_accuracy_plot(fig, ax, title: str, path: str, baseline: str = "full width") -> None:
  """Finishes an accuracy-against-FLOPs-reduction figure the way every benchmark draws it."""
  ax.set_xlabel(f"FLOPs reduction vs {baseline} (dev average, XLA cost analysis)")
  ax.set_ylabel("dev accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  report.save_figure(fig, path)
