"""An early-exit run served at a list of budgets beside its own full depth, timed side by side:
what `exit_serving`, `throughput` and `pareto` report for an early-exit run (no flags here, so
each benchmark keeps its own)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from absl import app

from benchmarks import common
from sharcs_jax.data import batching, glue
from sharcs_jax.run import Run, load_run
from sharcs_jax.serve import routing
from sharcs_jax import evaluate
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.exit_layout import calibration_split, leave_costs

FULL_DEPTH = "full depth"


@dataclasses.dataclass(frozen=True)
class ExitRun:
  """An early-exit run opened once: its kept model, its dev and calibration inputs, and the
  engine over every exit the benchmark reads."""
  workdir: str
  config: Any
  task: glue.Task
  run: Run
  engine: Engine
  dev: batching.Encoded
  calibration: batching.Encoded
  options: dict  # what every engine of this run is built with (runtime, precision)

  def serve(self, **options: Any) -> Engine:
    return Engine.from_run(self.run, **{"signal": "entropy", **self.options, **options})


def open_exit_run(workdir: str, *, exit_layers: Sequence[int] | None = None,
                  runtime: str = "xla", precision: str = "fp32", limit: int = 0) -> ExitRun:
  """A usage error (one line) where the run holds no calibration split to fit budgets on, or
  its engine cannot run at this runtime and precision."""
  run = load_run(workdir)
  config = run.config
  options = {"runtime": runtime, "precision": precision}
  splits = glue.run_splits(config)
  every_layer = exit_layers or range(1, run.model.encoder.num_layers + 1)
  try:
    engine = Engine.from_run(run, exit_layers=every_layer, **options)
    calibration = calibration_split(config, workdir, splits)
  except ValueError as e:
    raise app.UsageError(str(e))
  dev = splits[1]
  dev_data, calibration_data = batching.encode_splits(
      [glue.first(dev, limit), calibration], engine.tokenizer, engine.length_buckets)
  return ExitRun(workdir, config, glue.get_task(config.task), run, engine, dev_data,
                 calibration_data, options)


def stage_gflops(engine: Engine, data: batching.Encoded) -> np.ndarray:
  """[S, N]: what each row pays to leave at each stage, that stage and every stage it reads."""
  return leave_costs(engine.stages, engine.stage_flops[:, data.bucket_of] / 1e9)


def serve_budgets(run: ExitRun, budgets: Sequence[str], *, signal: str = "entropy",
                  by_length: bool = False, rounds: int = 3) -> dict:
  """The run's full depth and each budget's calibrated engine ("2x", "0.4gflops", or "max":
  every row at the first exit), timed in interleaved rounds on dev: {"paths": {name: figures},
  "out_of_reach": {budget: why}, "exits": each stage alone, ...}.

  A depth-and-width run adds, at each budget, its full-width exits alone ("B, depth only");
  otherwise each budget also gets the other calibration's (pooled / per length bucket) dev
  reduction, from every stage's dev outputs."""
  engine, dev, calibration = run.engine, run.dev, run.calibration
  cheapest = stage_gflops(engine, calibration)[0].mean()  # every row leaves at the first exit
  most = routing.Budget(reduction=float(engine.full_gflops(calibration).mean() / cheapest))
  full = run.serve(exit_layers=[run.run.model.encoder.num_layers])  # one program, the last exit
  engines, other, out_of_reach = {FULL_DEPTH: full}, {}, {}
  calibration_stages, dev_stages = (engine.every_stage(d) for d in (calibration, dev))
  for budget in budgets:
    target = most if budget == "max" else budget
    try:
      rule = engine.calibrate(target, calibration, signal=signal, by_length=by_length,
                              every_stage=calibration_stages)
    except ValueError as e:
      out_of_reach[budget] = str(e)
      continue
    engines[budget] = engine.with_rule(rule)
    if engine.narrow_count:  # the same model's full-width exits alone
      engines[f"{budget}, depth only"] = engine.with_rule(engine.calibrate(
          target, calibration, signal=signal, every_stage=calibration_stages, narrow=False))
      continue
    unserved = engine.calibrate(target, calibration, signal=signal, by_length=not by_length,
                                every_stage=calibration_stages)
    other[budget] = routing.exit_reduction(unserved, dev_stages,
                                           engine.stage_flops[:, dev.bucket_of].T, dev.bucket_of)
  outputs = {}
  candidates = {name: (lambda name=name: outputs.__setitem__(name, engines[name].run(dev)))
                for name in engines}
  print(f"{len(dev)} {run.task.name} dev examples, {rounds} rounds per path", flush=True)
  times = common.time_side_by_side(candidates, rounds, warmup=1)
  full_gflops = full.full_gflops(dev).mean()
  base_rate = len(dev) / float(np.median(times[FULL_DEPTH]))
  paths = {}
  for name in engines:  # the full depth first, then the budgets in the order asked
    out, t = outputs[name], times[name]
    rate = len(dev) / float(np.median(t))
    rule = engines[name].rule
    paths[name] = {
        "seconds": t.tolist(), "examples_per_second": rate, "speedup": rate / base_rate,
        "gflops_per_example": float(out.gflops.mean()),
        "dev_reduction": full_gflops / float(out.gflops.mean()),
        "calibration_reduction": rule.calibration_reduction, "rule": rule.to_json(),
        "mean_exit_layer": float(out.exit_layers.mean()),
        "narrow_share": float(np.mean(out.widths < 1.0)),
        **evaluate.classification_metrics(out.labels, dev.labels, run.task.metrics)}
    if name in other:
      paths[name]["dev_reduction_other_calibration"] = other[name]
  leave_at = stage_gflops(engine, dev).mean(1)
  exits = [{"exit": name, "gflops": float(g), "dev_reduction": full_gflops / float(g),
            **evaluate.classification_metrics(p.argmax(-1), dev.labels, run.task.metrics)}
           for name, g, p in zip(engine.route_names(), leave_at, dev_stages)]
  return {"examples": len(dev), "task": run.task.name, "workdir": run.workdir,
          "exit_pooling": run.run.model.pooling, "exit_layers": list(engine.exit_layers),
          "stage_widths": list(engine.stage_widths), "signal": signal, "rounds": rounds,
          "runtime": engine.runtime, "precision": engine.precision,
          "calibration": "per length bucket" if by_length else "pooled",
          "calibration_examples": len(calibration), "cpu": common.cpu_info(),
          "full_depth_gflops": float(full_gflops), "paths": paths, "out_of_reach": out_of_reach,
          "exits": exits}
